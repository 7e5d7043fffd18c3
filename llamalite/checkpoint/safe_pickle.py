"""Every pickle llamalite reads goes through this module: nothing a checkpoint holds can run code.

- `dcp/.metadata` (read by plain `pickle.load` in PyTorch's FileSystemReader) goes through RestrictedUnpickler, which
  resolves only the globals in ALLOWED_GLOBALS (the classes of torch.distributed.checkpoint's metadata, torch.Size and
  torch's dtype, layout and memory-format constants) and refuses every other one before it is imported or called.
- optimizer.pt, rng.pt and the non-tensor entries of DCP shards go through load_weights_only: torch.load with
  weights_only=True (tensors, numbers, strings and plain containers).
Both turn every failure into a one-line CheckpointError naming the file.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import IO, Any

import torch

from llamalite.errors import CheckpointError

METADATA_MODULE = "torch.distributed.checkpoint.metadata"
METADATA_CLASSES = ("Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                    "ChunkStorageMetadata", "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING")
TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)  # values, never callables

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    *((METADATA_MODULE, name) for name in METADATA_CLASSES),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # how a TensorProperties' layout is pickled: a lookup by name
    *(("torch", name) for name, value in vars(torch).items() if isinstance(value, TORCH_CONSTANTS)),
    ("collections", "OrderedDict"),
    # StorageMeta.checkpoint_id, the path the checkpoint was saved to: pickled as pathlib's (pathlib._local's from
    # Python 3.13)
    *(("pathlib", cls.__name__) for cls in (pathlib.PosixPath, pathlib.PurePosixPath)),
    *((cls.__module__, cls.__name__) for cls in (pathlib.PosixPath, pathlib.PurePosixPath)),
})


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that resolves only `allowed` (module, name) pairs; any other global is a CheckpointError
    naming `source`, raised before the module is imported."""

    def __init__(self, file: IO[bytes], allowed: frozenset[tuple[str, str]], source: Path | str):
        super().__init__(file)
        self.allowed = allowed
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise CheckpointError(f"refusing to load {self.source}: it references {module}.{name}, which a "
                                  "checkpoint's metadata never holds (a file not written by llamalite, perhaps made "
                                  "to run code); use another checkpoint")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"refusing to load {self.source}: it holds a persistent reference, which a "
                              "checkpoint's metadata never holds; use another checkpoint")


def restricted_loads(data: bytes, source: Path | str,
                     allowed: frozenset[tuple[str, str]] = ALLOWED_GLOBALS) -> Any:
    """Unpickle `data` admitting only `allowed` globals. Any failure is a one-line CheckpointError naming `source`:
    with only those globals reachable, every exception comes from the bytes themselves (truncated, malformed, or
    arguments those classes reject)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), allowed, source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # the file's fault, whatever the type (docstring)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{source} is not readable DCP metadata ({type(exc).__name__}: {reason}): "
                              "use another checkpoint") from None


def load_weights_only(file: Path | IO[bytes], source: Path | str, map_location: str | torch.device = "cpu") -> Any:
    """torch.load(weights_only=True) of a path or a seekable binary file. A pickle that needs anything else is
    refused, and every other failure (not a torch file, truncated, damaged) is a one-line CheckpointError naming
    `source`: torch's weights-only unpickler calls nothing outside its allow-list, so any exception is the file's."""
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"refusing to load {source}: it holds objects other than tensors "
                              "(not written by llamalite?); use another checkpoint") from None
    except Exception as exc:  # the file's fault, whatever the type (docstring)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{source} cannot be read ({reason}): use another checkpoint") from None


def read_dcp_metadata(path: Path) -> Any:
    """`dcp/.metadata` as a torch.distributed.checkpoint Metadata, unpickled with the restricted unpickler and checked
    so that its shard files are plain names inside the DCP folder."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read ({exc.strerror or exc}): use another checkpoint") from None
    metadata = restricted_loads(data, path)
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise CheckpointError(f"{path} holds no DCP Metadata: use another checkpoint")
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise CheckpointError(f"{path} lists no shard files: use another checkpoint")
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{path} lists a shard entry of the wrong kind: use another checkpoint")
        name = info.relative_path
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
            raise CheckpointError(f"{path} names shard file {name!r}, which is not a file of its folder: "
                                  "use another checkpoint")
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (info.offset, info.length)):
            raise CheckpointError(f"{path} gives {index.fqn!r} an invalid offset or length: use another checkpoint")
    return metadata
