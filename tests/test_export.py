"""The unclip-jax pipeline folder format: exact round trips (buffers included, bfloat16 storage),
and one clear refusal per way a folder can be wrong."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pipeline_fixtures import materialise, random_pipeline
from unclip_jax.errors import UserError
from unclip_jax.io import pipeline_folder, safetensors
from unclip_jax.models.diffusion_prior import DiffusionPrior, PriorConfig


def _prior(seed=0):
    m = materialise(lambda: DiffusionPrior(PriorConfig(
        embed_dim=8, context_length=4, num_heads=2, head_dim=4, num_layers=1,
        embed_norm="mean_std"), rngs=nnx.Rngs(0)), seed)
    m.set_embedding_stats(np.arange(8) * 0.1, 1.0 + np.arange(8) * 0.01)
    return m


def _state(m):
    return {k: np.asarray(jax.device_get(v[...])) for k, v in pipeline_folder.flat_state(m).items()}


def test_component_round_trip_with_buffers_and_bf16(tmp_path):
    m = _prior()
    entry = pipeline_folder.save_component(tmp_path, "prior", m)
    assert entry == {"class": "DiffusionPrior", "config": pipeline_folder.config_to_dict(m.config),
                     "weights": "prior.safetensors"}
    manifest = pipeline_folder.read_manifest(tmp_path)
    assert manifest["format"] == "unclip-jax-pipeline" and manifest["version"] == 1
    back = pipeline_folder.load_component(tmp_path, "prior")
    assert back.config == m.config
    a, b = _state(m), _state(back)
    assert set(a) == set(b) and "clip_mean" in a and "clip_std" in a
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # bfloat16 storage: half the bytes, values rounded, loaded back as the config's float32.
    pipeline_folder.save_component(tmp_path, "small", m, dtype="bfloat16")
    heads = [safetensors.TensorFiles([str(tmp_path / f)]).headers for f in ("small.safetensors", "prior.safetensors")]
    assert heads[0]["clip_std"][1]["dtype"] == "BF16"
    data = [max(info["data_offsets"][1] for _, info in h.values()) for h in heads]
    assert data[0] * 2 == data[1]
    small = pipeline_folder.load_component(tmp_path, "small")
    for k, v in _state(small).items():
        assert v.dtype == np.float32
        np.testing.assert_allclose(v, a[k], rtol=1e-2, atol=1e-6)
        np.testing.assert_array_equal(v, np.asarray(jnp.asarray(a[k]).astype(jnp.bfloat16).astype(jnp.float32)))


def test_whole_pipeline_round_trip(tmp_path):
    pipe = random_pipeline(seed=3)
    pipe.save_pretrained(tmp_path / "p")
    names = set(json.loads((tmp_path / "p" / "unclip.json").read_text())["components"])
    assert names == {"clip", "prior", "ar_prior", "decoder", "super_res_first"}
    from unclip_jax.pipeline import UnCLIPPipeline
    back = UnCLIPPipeline.from_pretrained(tmp_path / "p")
    assert back.settings == pipe.settings
    for name, m in pipe.components().items():
        other = back.components()[name]
        assert type(other) is type(m) and other.config == m.config
        a, b = _state(m), _state(other)
        assert set(a) == set(b)
        assert all(np.array_equal(a[k], b[k]) for k in a), name
    # The AR prior's quantizer (buffers, an int flag included) came along.
    assert int(back.ar_prior.quantizer.fitted[...]) == 1


def _rewrite(path, drop=None, add=None, reshape=None):
    t = safetensors.TensorFiles([str(path)])
    arrays = {n: np.asarray(t.read(n)) for n in t.names() if n != drop}
    if add:
        arrays[add] = np.zeros((2,), np.float32)
    if reshape:
        arrays[reshape] = np.zeros((3, 3), np.float32)
    safetensors.write(str(path), arrays)


def test_refusals_name_what_is_wrong(tmp_path):
    with pytest.raises(pipeline_folder.FolderError, match="does not exist"):
        pipeline_folder.read_manifest(tmp_path / "nope")
    with pytest.raises(pipeline_folder.FolderError, match="no unclip.json"):
        pipeline_folder.read_manifest(tmp_path)
    m = _prior()
    pipeline_folder.save_component(tmp_path, "prior", m)
    manifest_file = tmp_path / "unclip.json"
    good = manifest_file.read_text()
    manifest_file.write_text(good.replace('"unclip-jax-pipeline"', '"something-else"'))
    with pytest.raises(pipeline_folder.FolderError, match="format 'something-else'"):
        pipeline_folder.read_manifest(tmp_path)
    manifest_file.write_text(good.replace('"version": 1', '"version": 7'))
    with pytest.raises(pipeline_folder.FolderError, match="version 7"):
        pipeline_folder.read_manifest(tmp_path)
    manifest_file.write_text(good)
    with pytest.raises(pipeline_folder.FolderError, match="no component 'decoder'"):
        pipeline_folder.load_component(tmp_path, "decoder")

    weights = tmp_path / "prior.safetensors"
    _rewrite(weights, drop="clip_mean", add="extra.bias", reshape="proj_in.bias")
    with pytest.raises(pipeline_folder.FolderError) as e:
        pipeline_folder.load_component(tmp_path, "prior")
    msg = str(e.value)
    assert isinstance(e.value, UserError)
    assert "missing tensors (1): clip_mean" in msg
    assert "unexpected tensors (1): extra.bias" in msg
    assert "proj_in.bias (file (3, 3), model (8,))" in msg


def test_failed_save_keeps_the_good_folder(tmp_path):
    out = tmp_path / "p"
    pipeline_folder.save_folder_atomically(out, lambda d: pipeline_folder.save_component(d, "prior", _prior()))
    before = (out / "prior.safetensors").read_bytes()

    def broken(d):
        pipeline_folder.save_component(d, "prior", _prior(seed=5))
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        pipeline_folder.save_folder_atomically(out, broken)
    assert (out / "prior.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["p"]  # no half-written folder left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(pipeline_folder.FolderError, match="refusing to replace"):
        pipeline_folder.save_folder_atomically(tmp_path / "other", lambda d: None)
