"""The one reader and writer of .safetensors files in unclip-jax (bfloat16 included).

    8 bytes      little-endian u64 N, the header's length
    N bytes      JSON object {NAME: {"dtype": "F32", "shape": [...], "data_offsets": [a, b]},
                              "__metadata__": {str: str}} (optional metadata)
    the rest     the tensors' bytes, little-endian, C order; offsets count from here

:func:`write` writes atomically (a temporary file renamed over ``path``), tensors ordered by
decreasing item size then name, so each one starts aligned to its item size. :class:`TensorFiles`
reads the headers of one or more files (a sharded checkpoint) and a tensor's bytes on demand;
:func:`read` returns every tensor of one file. bfloat16, which numpy cannot name, goes through
``ml_dtypes``. A file that is not a well-formed safetensors file (truncated, a header that is not
a JSON object, offsets that do not fit the shapes) is a :class:`SafetensorsError` naming it.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Iterable

import ml_dtypes
import numpy as np

from unclip_jax.errors import UserError
from unclip_jax.io import paths
from unclip_jax.io.atomic import atomic_write

METADATA = "__metadata__"
MAX_HEADER_BYTES = 100 * 2**20
"""The largest header read (real ones are well under 1 MB even for thousands of tensors)."""

# numpy dtype name <-> safetensors dtype code
DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
          "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
          "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL"}
_NUMPY = {code: np.dtype(ml_dtypes.bfloat16 if name == "bfloat16" else name)
          for name, code in DTYPES.items()}


class SafetensorsError(UserError, ValueError):
    """A .safetensors file that cannot be read, or tensors that cannot be written as one."""


def _invalid(path: str, why: str) -> SafetensorsError:
    return SafetensorsError(f"{path} is not a valid safetensors file ({why}); it is damaged or "
                            "was not written as safetensors: write it again.")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

def write(path: str | os.PathLike, tensors: dict[str, Any],
          metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array) as the safetensors file ``path``, atomically.

    ``metadata`` goes to the header's ``__metadata__`` (torch-side loaders want
    ``{"format": "pt"}``). The parent folder is created if needed.
    """
    path = os.fspath(path)
    arrays = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == METADATA:
            raise SafetensorsError(f"Cannot write {path}: tensor name {name!r} is not allowed "
                                   "(names are strings other than '__metadata__').")
        a = np.asarray(value, order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
        if DTYPES.get(a.dtype.name) is None:
            raise SafetensorsError(f"Tensor {name} has dtype {a.dtype}, which safetensors cannot "
                                   f"hold (it holds {', '.join(DTYPES)}); cast it before writing "
                                   f"{path}.")
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        arrays[name] = a
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise SafetensorsError(f"Cannot write {path}: metadata must map strings to strings "
                                   f"(offending keys: {bad}).")
        header[METADATA] = dict(metadata)
    offset, order = 0, sorted(arrays, key=lambda n: (-arrays[n].dtype.itemsize, n))
    for name in order:
        a = arrays[name]
        header[name] = {"dtype": DTYPES[a.dtype.name], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write_to(f):
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name in order:
            f.write(arrays[name].tobytes())

    paths.makedirs(paths.dirname(paths.absolute(path)))
    atomic_write(path, write_to)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """(name -> {"dtype", "shape", "data_offsets"}, metadata, byte offset of the data) of a
    safetensors file, every entry checked against the file's size before any data is read."""
    path = os.fspath(path)
    try:
        size = paths.getsize(path)
        with paths.open(path, "rb") as f:
            first = f.read(8)
            if len(first) < 8:
                raise _invalid(path, f"{size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", first)
            if header_len > MAX_HEADER_BYTES:
                raise _invalid(path, f"the header claims {header_len} bytes, more than the "
                                     f"{MAX_HEADER_BYTES} bytes a real header needs")
            if header_len > size - 8:
                raise _invalid(path, f"truncated: the header claims {header_len} bytes, the file "
                                     f"has {size - 8} after the length")
            raw = f.read(header_len)
            if len(raw) != header_len:
                raise _invalid(path, f"truncated: {len(raw)} of the header's {header_len} bytes")
    except OSError as e:
        raise SafetensorsError(f"{path} cannot be read: {e}") from e
    try:
        header = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _invalid(path, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _invalid(path, f"the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop(METADATA, None) or {}
    if not isinstance(metadata, dict):
        raise _invalid(path, f"{METADATA} is a JSON {type(metadata).__name__}, not an object")
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise _invalid(path, f"{METADATA} values must be strings (offending keys: {bad[:3]})")
    data_start, data_len = 8 + header_len, size - 8 - header_len
    spans = []
    for name, info in header.items():
        _check_entry(path, name, info, data_len)
        if info["data_offsets"][1] > info["data_offsets"][0]:
            spans.append((info["data_offsets"][0], info["data_offsets"][1], name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise _invalid(path, f"tensors {_short(a)} and {_short(b)} overlap in the data")
    return header, metadata, data_start


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a hostile header can hold huge values)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _check_entry(path: str, name: str, info: Any, data_len: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _invalid(path, f"tensor {_short(name)} needs 'dtype', 'shape' and 'data_offsets'")
    if not isinstance(info["dtype"], str) or info["dtype"] not in _NUMPY:
        raise _invalid(path, f"tensor {_short(name)} has dtype {_short(info['dtype'])}; "
                             f"unclip-jax reads {', '.join(_NUMPY)}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= 64
            and all(type(d) is int and d >= 0 for d in shape)):
        raise _invalid(path, f"tensor {_short(name)} has shape {_short(shape)}, not a list of "
                             "sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _invalid(path, f"tensor {_short(name)} has data_offsets {_short(offsets)}")
    want = math.prod(shape) * _NUMPY[info["dtype"]].itemsize
    if offsets[1] - offsets[0] != want:
        raise _invalid(path, f"tensor {_short(name)} spans {offsets[1] - offsets[0]} bytes, its "
                             f"{info['dtype']} shape {shape} needs {want}")
    if offsets[1] > data_len:
        raise _invalid(path, f"truncated: tensor {_short(name)} ends at byte {offsets[1]} of the "
                             f"data, which has {data_len}")


class TensorFiles:
    """Name -> (file, dtype, shape) over one or more safetensors files; reads on demand.

    ``headers[name]`` is ``(file, {"dtype", "shape", "data_offsets"})``; ``metadata[file]`` the
    file's ``__metadata__``."""

    def __init__(self, files: Iterable[str | os.PathLike]):
        self.headers: dict[str, tuple[str, dict]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self._data_start: dict[str, int] = {}
        for file in map(os.fspath, files):
            header, self.metadata[file], self._data_start[file] = read_header(file)
            for name, info in header.items():
                if name in self.headers:
                    raise SafetensorsError(f"Tensor {name} appears in both "
                                           f"{self.headers[name][0]} and {file}.")
                self.headers[name] = (file, info)

    def names(self) -> set[str]:
        return set(self.headers)

    def shape(self, name: str) -> tuple:
        return tuple(self.headers[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        """The numpy dtype the tensor ``name`` is stored as."""
        return _NUMPY[self.headers[name][1]["dtype"]]

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a new (writable) numpy array."""
        file, info = self.headers[name]
        start, end = info["data_offsets"]
        buf = np.empty(end - start, np.uint8)
        with paths.open(file, "rb") as f:
            f.seek(self._data_start[file] + start)
            if paths.is_remote(file):   # remote file objects (gfile) may lack readinto
                data = f.read(end - start)
                got = len(data)
                buf[:got] = np.frombuffer(data, np.uint8)
            else:
                got = f.readinto(buf)
        if got != end - start:
            raise _invalid(file, f"truncated: tensor {name!r} has {got} of its {end - start} "
                                 "bytes")
        return buf.view(_NUMPY[info["dtype"]]).reshape(info["shape"])


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of one safetensors file, by name."""
    files = TensorFiles([path])
    return {name: files.read(name) for name in sorted(files.names())}


def dtype_kind(dtype) -> str:
    """'float', 'int' or 'bool': what a dtype holds (widths aside)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return "bool"
    if dtype.kind in "iu":
        return "int"
    return "float"   # f, and bfloat16 (kind 'V' in ml_dtypes)


def cast_checked(array: np.ndarray, dtype, what: str) -> np.ndarray:
    """``array`` as ``dtype`` when that keeps its meaning: float widths change freely (a narrower
    storage type), integers only when every value fits; an integer tensor is never cast to a
    float parameter or back (one SafetensorsError naming ``what``)."""
    dtype = np.dtype(dtype)
    have, want = dtype_kind(array.dtype), dtype_kind(dtype)
    if have != want:
        raise SafetensorsError(f"{what} is stored as {array.dtype} ({have}), but the model's "
                               f"variable is {dtype} ({want}); a tensor is never cast between "
                               "integer and float types. The file does not belong to this model "
                               "or was written wrongly: write it again.")
    if want == "int" and array.dtype != dtype and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise SafetensorsError(f"{what} holds values outside {dtype}'s range "
                                   f"[{info.min}, {info.max}]; the file does not belong to this "
                                   "model: write it again.")
    return array.astype(dtype, copy=False)
