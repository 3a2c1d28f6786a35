"""Reading torch.distributed.checkpoint (DCP) folders without unpickling code.

DCP stores tensors with `torch.save` (read back with `weights_only=True`), but it reads its
`.metadata` file with a plain `pickle.load` and non-tensor entries with `weights_only=False`: a
crafted checkpoint would run code when loaded. `SafeFileSystemReader` unpickles the metadata with
an allow-list of the classes DCP's metadata is made of, and `TensorOnlyLoadPlanner` refuses
non-tensor entries (Switchyard saves none).
"""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asks for something a checkpoint never needs (code, foreign objects)."""


_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"asks to unpickle {module}.{name}, which a checkpoint never needs")


def read_dcp_metadata(data: bytes) -> Metadata:
    metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"holds a {type(metadata).__name__}, not checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = read_dcp_metadata(f.read())
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value) -> None:
        raise UnsafeCheckpointError(f"has entry {read_item.dest_index.fqn} as a pickled object, not a tensor")
