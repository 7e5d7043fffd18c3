"""The one way llamalite reads DCP shards: dcp_load through SafeFileSystemReader.

PyTorch's FileSystemReader unpickles `.metadata` with a plain pickle.load, and its default planner loads each
non-tensor entry of the shards (optimizer hyperparameters, or any entry the metadata declares as bytes) with
torch.load(weights_only=False). SafeFileSystemReader reads the metadata through checkpoint/safe_pickle.py's restricted
unpickler and hands the planner only bytes that passed torch's weights-only loader; its tensor reads were already
weights-only. Imported lazily (torch.distributed.checkpoint costs a second to import).
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from llamalite.checkpoint.safe_pickle import load_weights_only, read_dcp_metadata
from llamalite.errors import CheckpointError, LlamaliteError

logger = logging.getLogger(__name__)


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader without an unrestricted unpickling anywhere."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        return super().read_data(plan, WeightsOnlyBytesPlanner(planner, Path(self.path)))


class WeightsOnlyBytesPlanner:
    """A load planner's proxy whose load_bytes passes the planner only what torch's weights-only loader read: the
    object is saved again, so the planner's own torch.load(weights_only=False) sees nothing but plain types."""

    def __init__(self, planner: Any, dcp_dir: Path):
        self._planner = planner
        self._dcp_dir = dcp_dir

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        source = f"{self._dcp_dir} (entry {read_item.dest_index.fqn})"
        checked = load_weights_only(value, source)
        clean = io.BytesIO()
        torch.save(checked, clean)
        clean.seek(0)
        self._planner.load_bytes(read_item, clean)


def dcp_load(state: dict[str, Any], dcp_dir: Path) -> None:
    """dcp.load(state) from the DCP folder `dcp_dir` through SafeFileSystemReader. Whatever the files do wrong is a
    one-line CheckpointError: DCP wraps each rank's exception in a CheckpointException with its traceback as text."""
    import torch.distributed.checkpoint as dcp

    reader = SafeFileSystemReader(str(dcp_dir))
    reader.read_metadata()  # refused here in one line, before DCP's fallback to per-rank metadata logs a traceback
    try:
        with warnings.catch_warnings():  # one process reading shards is intended (consolidate, eval, generate...)
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load(state, storage_reader=reader)
    except CheckpointException as exc:
        raise one_line_error(exc, dcp_dir) from None


def one_line_error(exc: CheckpointException, dcp_dir: Path) -> BaseException:
    """The error to raise for a failed dcp.load: ours as it was, an interrupt as it was, anything else (the files'
    fault: truncated or inconsistent shards, metadata that does not fit the model) as a CheckpointError."""
    failures = [failure for failure, _ in exc.failures.values()]
    for failure in failures:
        if isinstance(failure, LlamaliteError) or not isinstance(failure, Exception):
            return failure
    first = failures[0] if failures else exc
    logger.debug("dcp.load of %s failed: %s", dcp_dir, exc)
    if isinstance(first, pickle.UnpicklingError):  # torch's weights-only loader refused a tensor entry
        return CheckpointError(f"refusing to load {dcp_dir}: a shard holds objects other than tensors "
                               "(not written by llamalite?); use another checkpoint")
    reason = str(first).strip().splitlines()[0] if str(first).strip() else type(first).__name__
    return CheckpointError(f"{dcp_dir} cannot be loaded ({type(first).__name__}: {reason}): use another checkpoint")
