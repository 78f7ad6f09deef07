"""A streaming, validating safetensors reader.

The deploy loader reads one tensor at a time straight into the memory that will hold it (`read_into`),
with plain file reads rather than a memory map: mapped pages would count towards resident memory until
the file is closed, which is what the packed deployment is meant to avoid. Every structural problem
(truncated file, foreign file, bad header, a shape that does not match its byte range) becomes a
TerditError naming the file and the tensor. Writing uses `terdit.io.save_tensors`.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from terdit.errors import TerditError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 1024 * 1024


class TensorFile:
    """Header of a safetensors file, and reads of single tensors from it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise TerditError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TerditError(f"{self.path}: not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, MAX_HEADER):
                raise TerditError(f"{self.path}: not a safetensors file (header length {n} is impossible)")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise TerditError(f"{self.path}: not a safetensors file (bad header: {e})") from e
        if not isinstance(header, dict):
            raise TerditError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            self._entries[name] = self._parse_entry(name, e, size - self._data_start)

    def _parse_entry(
        self, name: str, e: object, data_size: int
    ) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        where = f"{self.path}: tensor {name!r}"
        try:
            dtype = DTYPES[e["dtype"]]  # type: ignore[index]
            shape = tuple(int(s) for s in e["shape"])  # type: ignore[index]
            begin, end = (int(o) for o in e["data_offsets"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as err:
            raise TerditError(f"{where}: unsupported or malformed header entry ({err!r})") from err
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            raise TerditError(f"{where}: byte range {begin}..{end} does not fit shape {shape} of {dtype}")
        if end > data_size:
            raise TerditError(f"{where}: data ends past the end of the file (truncated file?)")
        return dtype, shape, begin, end

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self._entry(name)
        return end - begin

    def _entry(self, name: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        if name not in self._entries:
            raise TerditError(f"{self.path}: tensor {name!r} is missing")
        return self._entries[name]

    def read(self, name: str) -> torch.Tensor:
        """A new CPU tensor with the stored dtype and shape."""
        dtype, shape, _, _ = self._entry(name)
        out = torch.empty(shape, dtype=dtype)
        return self.read_into(name, out)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` into the contiguous CPU tensor `out` of the same dtype and shape."""
        dtype, shape, begin, end = self._entry(name)
        if (
            out.dtype != dtype
            or tuple(out.shape) != shape
            or not out.is_contiguous()
            or out.device.type != "cpu"
        ):
            raise TerditError(
                f"{self.path}: tensor {name!r} is {dtype} {shape}, expected {out.dtype} {tuple(out.shape)}"
            )
        if end == begin:
            return out
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            got = f.readinto(view)
        if got != end - begin:
            raise TerditError(f"{self.path}: tensor {name!r} is truncated")
        return out
