"""A GGUF file's metadata and tensor table, read in milliseconds.

`gguf.GGUFReader` builds one numpy memmap view per metadata item: for a tokenizer's 49k tokens
and 49k merges that is ~250k views and 2.7 s of parsing (measured on the 2-core CI machine, the
embedded SmolLM2 GGUF), paid by every worker and by the router at start-up. Here the metadata
is read with `struct` from one buffer and numeric arrays with `np.frombuffer`; tensors are the
same memmap slices GGUFReader gives (`data` in its layout, so `gguf.quants.dequantize` takes
them unchanged). tests/test_gguf_file.py compares every field and tensor with GGUFReader's.

Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3,
little-endian; a big-endian file gets a clear error).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> (struct format, numpy dtype) for the fixed-size ones
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("<B", np.dtype("<u1")),
    1: ("<b", np.dtype("<i1")),
    2: ("<H", np.dtype("<u2")),
    3: ("<h", np.dtype("<i2")),
    4: ("<I", np.dtype("<u4")),
    5: ("<i", np.dtype("<i4")),
    6: ("<f", np.dtype("<f4")),
    7: ("<?", np.dtype("?")),
    10: ("<Q", np.dtype("<u8")),
    11: ("<q", np.dtype("<i8")),
    12: ("<d", np.dtype("<f8")),
}

# tensor types stored as plain numpy arrays (the rest are quantized blocks, kept as bytes)
_PLAIN_TYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I8": np.int8,
                "I16": np.int16, "I32": np.int32, "I64": np.int64}


class GGUFFormatError(ValueError):
    """Not a GGUF file this reader understands (magic, version, byte order, truncation)."""


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's entry: `shape` in GGUF order (innermost first, as GGUFReader's), `data` a
    read-only memmap slice: typed and reshaped to the numpy (outermost-first) shape for float /
    integer types, raw bytes shaped [..., bytes per row] for quantized ones."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFFile:
    """`fields`: metadata key -> Python value (str, int, float, bool, or a list of them);
    `tensors`: the tensor table in file order."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._mm = np.memmap(self.path, mode="r")
        buf = memoryview(self._mm)
        self._buf = buf
        if bytes(buf[:4]) != GGUF_MAGIC:
            raise GGUFFormatError(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        (version,) = struct.unpack_from("<I", buf, 4)
        if version not in (2, 3):
            hint = " (a big-endian GGUF?)" if version & 0xFFFF == 0 else ""
            raise GGUFFormatError(f"{self.path}: GGUF version {version} not supported{hint}")
        self.version = version
        try:
            tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
            off = 24
            self.fields: dict[str, Any] = {}
            for _ in range(kv_count):
                key, off = self._string(off)
                (vtype,) = struct.unpack_from("<I", buf, off)
                self.fields[key], off = self._value(vtype, off + 4)
            infos = []
            for _ in range(tensor_count):
                name, off = self._string(off)
                (n_dims,) = struct.unpack_from("<I", buf, off)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
                ggml_type, rel = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
                off += 4 + 8 * n_dims + 12
                infos.append((name, dims, ggml_type, rel))
        except struct.error as e:
            raise GGUFFormatError(f"{self.path}: truncated GGUF header ({e})") from None
        align = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            raise GGUFFormatError(f"{self.path}: general.alignment {align} is not a power of two")
        self.data_offset = -(-off // align) * align
        self.tensors = [self._tensor(*info) for info in infos]

    # ------------------------------------------------------------------ metadata values

    def _string(self, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, off)
        end = off + 8 + n
        if end > len(self._buf):
            raise struct.error("string past the end of the file")
        return bytes(self._buf[off + 8 : end]).decode("utf-8"), end

    def _value(self, vtype: int, off: int) -> tuple[Any, int]:
        if vtype == _STRING:
            return self._string(off)
        if vtype == _ARRAY:
            etype, count = struct.unpack_from("<IQ", self._buf, off)
            off += 12
            if etype in _SCALARS:
                dt = _SCALARS[etype][1]
                arr = np.frombuffer(self._buf, dtype=dt, count=count, offset=off)
                return arr.tolist(), off + count * dt.itemsize
            items = []
            for _ in range(count):
                item, off = self._value(etype, off)
                items.append(item)
            return items, off
        if vtype not in _SCALARS:
            raise GGUFFormatError(f"{self.path}: unknown GGUF value type {vtype}")
        fmt = _SCALARS[vtype][0]
        return struct.unpack_from(fmt, self._buf, off)[0], off + struct.calcsize(fmt)

    # ------------------------------------------------------------------ tensors

    def _tensor(self, name: str, dims: tuple[int, ...], ggml_type: int, rel: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import quant_shape_to_byte_shape

        qtype = GGMLQuantizationType(ggml_type)
        n_elems = int(np.prod(dims, dtype=np.int64)) if dims else 1
        np_dims = tuple(reversed(dims))
        plain = _PLAIN_TYPES.get(qtype.name)
        start = self.data_offset + rel
        if plain is not None:
            dt = np.dtype(plain).newbyteorder("<")
            nbytes = n_elems * dt.itemsize
        else:
            block, type_size = GGML_QUANT_SIZES[qtype]
            dt, nbytes = np.dtype(np.uint8), n_elems * type_size // block
            np_dims = quant_shape_to_byte_shape(np_dims, qtype)
        if start + nbytes > len(self._mm):
            raise GGUFFormatError(f"{self.path}: tensor {name!r} runs past the end of the file")
        data = self._mm[start : start + nbytes].view(dt).reshape(np_dims)
        return GGUFTensor(name=name, tensor_type=qtype, shape=tuple(int(d) for d in dims), data=data)
