"""The diffusers-style API: ``pipe(prompt, ...).images`` (the images of ``generate``), batching
that keeps the images, and what ``from_pretrained`` accepts: 'shapes', a diffusers folder or a
Hub id (converted once into the cache; the download faked), offline errors."""
import os
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from pipeline_fixtures import random_pipeline
from unclip_jax.assets import SHAPES
from unclip_jax.pipeline import PipelineError, UnCLIPPipeline, UnCLIPPipelineOutput, sources

PROMPTS = ["a red circle", "a blue square at the top", "a green triangle"]


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline()


class _TorchLikeGenerator:
    def initial_seed(self):
        return 3


def test_call_returns_the_images_of_generate(pipe):
    ref = pipe.generate(PROMPTS, num_images=2, seed=3)
    out = pipe(PROMPTS, num_images_per_prompt=2, generator=3)
    assert isinstance(out, UnCLIPPipelineOutput) and len(out.images) == 6
    assert all(isinstance(im, Image.Image) and im.size == (16, 16) for im in out.images)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in out.images]), ref)
    for gen in (dict(seed=3), dict(generator=jax.random.key(3)),
                dict(generator=jax.random.key_data(jax.random.key(3))),
                dict(generator=_TorchLikeGenerator())):
        (ims,) = pipe(PROMPTS, num_images_per_prompt=2, output_type="np", return_dict=False,
                      **gen)
        assert ims.dtype == np.float32 and ims.shape == (6, 16, 16, 3)
        np.testing.assert_array_equal(np.round(ims * 255).astype(np.uint8), ref)


def test_call_arguments_reach_the_stages(pipe, monkeypatch):
    seen = {}
    monkeypatch.setattr(pipe, "generate", lambda prompts, **kw: seen.update(kw) or np.zeros(
        (2, 4, 4, 3), np.float32))
    pipe("a red circle", 2, decoder_num_inference_steps=2, decoder_guidance_scale=1.5,
         prior_num_inference_steps=4, prior_guidance_scale=3.0, super_res_num_inference_steps=3,
         upsample=0, batch_size=1)
    assert seen["num_images"] == 2 and seen["upsample"] == 0 and seen["batch_size"] == 1
    assert seen["prior_settings"] == {"steps": 4, "guidance_scale": 3.0}
    assert seen["decoder_settings"] == {"steps": 2, "guidance_scale": 1.5}
    assert seen["super_res_settings"] == {"steps": 3}


def test_bad_calls_are_refused(pipe):
    with pytest.raises(PipelineError, match="either generator or seed"):
        pipe("a red circle", generator=1, seed=1)
    with pytest.raises(PipelineError, match="output_type"):
        pipe("a red circle", output_type="pt")
    with pytest.raises(PipelineError, match="generator must be"):
        pipe("a red circle", generator=[1, 2])
    with pytest.raises(PipelineError, match="has no steps"):
        pipe("a red circle", prior="ar", prior_num_inference_steps=3)
    with pytest.raises(PipelineError, match="batch_size"):
        pipe.generate("a red circle", batch_size=0)


@pytest.mark.parametrize("prior", ["diffusion", "ar"])
def test_batches_give_the_unbatched_images(pipe, prior):
    """3 prompts x 2 images in batches of 4 (the last padded): the same images, one compile."""
    kw = dict(num_images=2, seed=5, prior=prior, return_float=True)
    ref = pipe.generate(PROMPTS, **kw)
    before = dict(pipe.trace_counts)
    calls = []
    got = pipe.generate(PROMPTS, batch_size=4, progress=lambda s, t: calls.append((s, t)), **kw)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    new = {k: v - before.get(k, 0) for k, v in pipe.trace_counts.items()}
    assert new["decoder"] <= 1 and new["super_res_0"] <= 1   # the padded batch reuses it
    assert len(calls) == calls[0][1] == (6 if prior == "diffusion" else 5)


def test_sources_bundled_and_refusals(tmp_path):
    assert sources.resolve() == SHAPES and sources.resolve("shapes") == SHAPES
    with pytest.raises(PipelineError, match="neither an unclip-jax pipeline folder"):
        sources.resolve(str(tmp_path))
    with pytest.raises(PipelineError, match="not a folder, 'shapes' or a Hub id"):
        sources.resolve(str(tmp_path / "missing" / "deep" / "path"))
    with pytest.raises(PipelineError, match="dtype must be"):
        UnCLIPPipeline.from_pretrained("shapes", dtype="int8")


def test_hub_download_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError, match="pass its path"):
        sources.download("nobody/no-such-unclip", cache_dir=str(tmp_path))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # not installed
    with pytest.raises(PipelineError, match=r'pip install "unclip-jax\[hub\]"'):
        UnCLIPPipeline.from_pretrained("kakaobrain/karlo-v1-alpha", cache_dir=str(tmp_path))


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    from torch_reference import build_tiny_karlo
    src = tmp_path_factory.mktemp("karlo_src") / "karlo"
    build_tiny_karlo(str(src), seed=4)
    return str(src)


def test_diffusers_folder_and_hub_id_convert_once(karlo, tmp_path, monkeypatch):
    conversions = []
    real = sources.convert_diffusers_pipeline
    monkeypatch.setattr(sources, "convert_diffusers_pipeline",
                        lambda *a, **k: conversions.append(a) or real(*a, **k))
    cache = str(tmp_path / "cache")
    a = UnCLIPPipeline.from_pretrained(karlo, cache_dir=cache)
    assert len(conversions) == 1 and "text_encoder" in a.components()
    folder = sources.resolve(karlo, cache_dir=cache)
    assert os.path.dirname(folder) == os.path.join(cache, "converted")
    assert len(conversions) == 1                        # the second load reads the cache

    asked = []
    monkeypatch.setattr(sources, "download", lambda repo, **kw: asked.append((repo, kw)) or karlo)
    b = UnCLIPPipeline.from_pretrained("kakaobrain/karlo-v1-alpha", cache_dir=cache,
                                       local_files_only=True)
    assert asked[0][0] == "kakaobrain/karlo-v1-alpha" and asked[0][1]["local_files_only"]
    assert len(conversions) == 2 and os.path.isdir(
        os.path.join(cache, "converted", f"karlo-v1-alpha-{sources.cache_key(karlo)}"))
    assert sorted(b.components()) == sorted(a.components())
    UnCLIPPipeline.from_pretrained("kakaobrain/karlo-v1-alpha", cache_dir=cache)
    assert len(conversions) == 2

    # an edited source folder is converted again
    cfg = os.path.join(karlo, "model_index.json")
    os.utime(cfg, ns=(os.stat(cfg).st_atime_ns, os.stat(cfg).st_mtime_ns + 10**9))
    assert sources.resolve(karlo, cache_dir=cache) != folder and len(conversions) == 3


class _FakePipe:
    """Records what the commands pass; returns blank images."""
    trace_counts: dict = {}
    settings: dict = {}   # the defaults generate records in each PNG's metadata

    def __init__(self):
        self.calls = []

    def generate(self, prompts, num_images=1, **kw):
        self.calls.append(kw)
        return np.zeros((len(prompts) * num_images, 4, 4, 3), np.uint8)


def test_commands_pass_dtype_and_batch_size(tmp_path, monkeypatch):
    from unclip_jax import applications, cli
    from unclip_jax.commands import apps as apps_cmd
    fake, loaded = _FakePipe(), []
    monkeypatch.setattr(UnCLIPPipeline, "from_pretrained",
                        classmethod(lambda cls, path, dtype=None: loaded.append(dtype) or fake))
    assert cli.main(["generate", "--prompt", "a red circle", "--num-images", "3", "--batch-size",
                     "2", "--dtype", "bfloat16", "--out", str(tmp_path / "g")]) == 0
    assert loaded == ["bfloat16"] and fake.calls[0]["batch_size"] == 2
    assert cli.main(["generate", "--prompt", "a", "--out", str(tmp_path / "g"),
                     "--overwrite"]) == 0
    assert loaded[-1] == "float32" and fake.calls[-1]["batch_size"] is None   # CPU default
    with pytest.raises(SystemExit) as refused:   # argparse refuses it
        cli.main(["generate", "--prompt", "a", "--batch-size", "0"])
    assert refused.value.code == 2

    # textdiff in batches of 2 thetas: the thetas split, each batch with the same seed
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "in.png")
    seen = []
    monkeypatch.setattr(apps_cmd, "load_pipeline", lambda path, dtype=None: seen.append(dtype))
    monkeypatch.setattr(applications, "textdiff", lambda pipe, image, c, t, thetas, seed, **kw: (
        seen.append((list(thetas), seed)) or applications.TextDiff(
            np.zeros((len(thetas), 4, 4, 3), np.uint8), None, np.asarray(thetas), None)))
    assert cli.main(["textdiff", "--image", str(tmp_path / "in.png"), "--caption", "a", "--target",
                     "b", "--thetas", "0,0.5,1", "--batch-size", "2", "--dtype", "float16",
                     "--out", str(tmp_path / "td")]) == 0
    assert seen == ["float16", ([0.0, 0.5], 0), ([1.0], 0)]
    assert len(os.listdir(tmp_path / "td")) == 4
