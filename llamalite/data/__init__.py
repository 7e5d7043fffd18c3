"""Text -> token shards -> batches: `prepare` builds shards, `TokenLoader` reads them.

Kept free of heavy imports so that `from llamalite.data import DataError` is cheap everywhere.
"""


class DataError(ValueError):
    """A data problem the user can fix, worded as one line that names the problem and the fix."""
