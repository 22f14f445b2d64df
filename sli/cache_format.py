"""The layer cache's file format: a safetensors file whose header names the model, layer and
config, and the checksum that guards it.

Serialized straight from the tensors' memory (no whole-file copy) and parsed without copying
(each tensor views the file's buffer or mapping).
"""
from __future__ import annotations

import json
import struct
from typing import Any, Dict, List, Tuple

import torch
import xxhash

from .quantization.formats import CachedLayer

FORMAT_VERSION = 1

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}



def checksum(data) -> str:
    """xxh3-64 of the bytes: hashing runs several times faster than a cold disk read."""
    return xxhash.xxh3_64_hexdigest(data)


_DTYPE_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}


class SerializedEntry:
    """An entry in the safetensors format, as chunks that view the entry's tensors.

    ``safetensors.torch.save`` builds the whole file in one bytes object: a second copy of
    a layer (0.4 GB for a 7B layer in bf16) at the moment a warm-up holds the most. Here
    the header is built, and the tensor data is written and hashed straight from the
    tensors' memory. ``read`` hands out the chunks in order (diskcache's file-like input).
    """

    def __init__(self, entry: CachedLayer, header: Dict[str, str]) -> None:
        metadata = dict(header, linears=json.dumps(entry.linears, sort_keys=True), format=str(FORMAT_VERSION))
        described: Dict[str, Any] = {"__metadata__": metadata}
        self._chunks: List[Any] = []
        offset = 0
        for name, tensor in entry.tensors.items():
            t = tensor.detach().cpu().contiguous()
            nbytes = t.numel() * t.element_size()
            described[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [offset, offset + nbytes]}
            if nbytes:
                self._chunks.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            offset += nbytes
        head = json.dumps(described, separators=(",", ":")).encode("utf-8")
        head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
        self._chunks.insert(0, struct.pack("<Q", len(head)) + head)
        self.size = 8 + len(head) + offset
        self._next = 0

    def checksum(self) -> str:
        """:func:`checksum` of the file's bytes, without joining them."""
        h = xxhash.xxh3_64()
        for chunk in self._chunks:
            h.update(chunk)
        return h.hexdigest()

    def read(self, size: int = -1):
        if self._next >= len(self._chunks):
            return b""
        self._next += 1
        return self._chunks[self._next - 1]


def deserialize(buffer: bytearray) -> Tuple[CachedLayer, Dict[str, str]]:
    """Parse safetensors bytes without copying: each tensor is a view of ``buffer``."""
    if len(buffer) < 8:
        raise ValueError("file shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", bytes(buffer[:8]))
    if 8 + header_len > len(buffer):
        raise ValueError("header runs past the end of the file")
    header = json.loads(bytes(buffer[8:8 + header_len]))
    metadata = header.pop("__metadata__", {}) or {}
    base = 8 + header_len
    tensors: Dict[str, torch.Tensor] = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        if base + end > len(buffer):
            raise ValueError(f"tensor {name} runs past the end of the file")
        count = (end - start) // dtype.itemsize
        flat = torch.frombuffer(buffer, dtype=dtype, offset=base + start, count=count) if count else \
            torch.empty(0, dtype=dtype)
        tensors[name] = flat.view(info["shape"])
    linears = json.loads(metadata.get("linears", "{}"))
    return CachedLayer(tensors, linears), metadata

