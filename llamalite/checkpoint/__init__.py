"""Checkpoint directories: the format (format.py), sharded DCP weights (sharded.py), and loading for use (inference.py).

Every reader of a checkpoint goes through this package: one set of names, one atomic commit, one verifier.
"""
