"""The one safetensors reader and writer (unclip_jax.io.safetensors): exact round trips of every
dtype unclip-jax stores, files the reference library reads, atomic writes, and one clear error per
way a file can be damaged."""
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from unclip_jax.errors import UserError
from unclip_jax.io import safetensors


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "w.f32": rng.normal(size=(3, 5)).astype(np.float32),
        "w.bf16": rng.normal(size=(4, 2)).astype(ml_dtypes.bfloat16),
        "w.f16": rng.normal(size=(7,)).astype(np.float16),
        "count": np.array(7, np.int32),                       # 0-d
        "ids": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        "flag": np.array([True, False, True]),
        "bytes": np.arange(5, dtype=np.uint8),
        "empty": np.zeros((0, 4), np.float32),
        "strided": np.arange(12, dtype=np.float32).reshape(3, 4).T,  # not C-contiguous
    }


def test_round_trip_of_every_dtype(tmp_path):
    path = str(tmp_path / "t.safetensors")
    tensors = _tensors()
    safetensors.write(path, tensors, metadata={"format": "pt", "note": "x"})
    back = safetensors.read(path)
    assert set(back) == set(tensors)
    for name, want in tensors.items():
        got = back[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == np.ascontiguousarray(want).tobytes(), name
        assert got.flags.writeable
    files = safetensors.TensorFiles([path])
    assert files.metadata[path] == {"format": "pt", "note": "x"}
    assert files.shape("ids") == (2, 3) and files.headers["w.bf16"][1]["dtype"] == "BF16"
    # every tensor starts at a multiple of its item size
    for name, (_, info) in files.headers.items():
        assert info["data_offsets"][0] % tensors[name].dtype.itemsize == 0, name


def test_files_agree_with_the_reference_library(tmp_path):
    ours = {k: v for k, v in _tensors().items() if v.dtype != ml_dtypes.bfloat16}
    path = str(tmp_path / "ours.safetensors")
    safetensors.write(path, ours)
    theirs = load_file(path)
    for name, want in ours.items():
        np.testing.assert_array_equal(theirs[name], want)
    other = str(tmp_path / "theirs.safetensors")
    save_file({k: np.ascontiguousarray(v) for k, v in ours.items()}, other)
    for name, got in safetensors.read(other).items():
        np.testing.assert_array_equal(got, ours[name])


def test_sharded_files_refuse_a_tensor_in_two_of_them(tmp_path):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    safetensors.write(a, {"x": np.zeros(2, np.float32), "y": np.ones(1, np.float32)})
    safetensors.write(b, {"z": np.zeros(2, np.float32)})
    files = safetensors.TensorFiles([a, b])
    assert files.names() == {"x", "y", "z"} and files.headers["z"][0] == b
    safetensors.write(b, {"x": np.zeros(2, np.float32)})
    with pytest.raises(safetensors.SafetensorsError, match="appears in both"):
        safetensors.TensorFiles([a, b])


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    safetensors.write(str(path), {"x": np.arange(3, dtype=np.float32)})
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError("No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        safetensors.write(str(path), {"x": np.zeros(1000, np.float32)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.safetensors"]
    # refused before anything is written
    with pytest.raises(safetensors.SafetensorsError, match="cannot hold"):
        safetensors.write(str(tmp_path / "new.safetensors"), {"c": np.zeros(2, np.complex64)})
    assert os.listdir(tmp_path) == ["t.safetensors"]


def _damaged(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _header(obj) -> bytes:
    head = json.dumps(obj).encode()
    return struct.pack("<Q", len(head)) + head


@pytest.mark.parametrize("case", ["truncated data", "truncated header", "short", "not json",
                                  "a list", "bad offsets"])
def test_a_damaged_file_is_one_clear_error_naming_it(tmp_path, case):
    good = tmp_path / "good.safetensors"
    safetensors.write(str(good), {"x": np.arange(6, dtype=np.float32)})
    raw = good.read_bytes()
    content = {
        "truncated data": raw[:-4],
        "truncated header": raw[:20],
        "short": raw[:5],
        "not json": struct.pack("<Q", 4) + b"{{{{",
        "a list": _header([1, 2, 3]),
        "bad offsets": _header({"x": {"dtype": "F32", "shape": [6], "data_offsets": [0, 20]}})
                       + bytes(24),
    }[case]
    path = _damaged(tmp_path, "bad.safetensors", content)
    with pytest.raises(safetensors.SafetensorsError) as e:
        safetensors.read(path)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a valid safetensors file")
    if case == "a list":
        assert "not an object" in msg
    if case.startswith("truncated"):
        assert "truncated" in msg
