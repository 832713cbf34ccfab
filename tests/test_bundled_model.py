"""The bundled Shapes model (unclip_jax/assets/shapes, package data): complete, small, loads
offline, and draws deterministic 128 x 128 images that the exact judge reads as their captions."""
import json
import os

import numpy as np
import pytest

from unclip_jax.assets import SHAPES, resolve_checkpoint

COMPONENTS = {"clip": "CLIP", "prior": "DiffusionPrior", "ar_prior": "ARPrior",
              "decoder": "Decoder", "sr64": "SuperRes", "sr128": "SuperRes"}
# A one-object and a two-object caption: the bundle draws captions like these right in nearly
# every sample (README and configs/shapes.py give its accuracy on 500 test captions x 2 images).
PROMPTS = ["a large blue square at the top left", "a red circle to the left of a green triangle"]


@pytest.fixture(scope="module")
def pipe():
    from unclip_jax.pipeline import UnCLIPPipeline
    return UnCLIPPipeline.from_pretrained(resolve_checkpoint(None))


def test_bundle_is_complete_small_and_bfloat16():
    assert resolve_checkpoint(None) == SHAPES
    with open(os.path.join(SHAPES, "unclip.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    assert {k: v["class"] for k, v in manifest["components"].items()} == COMPONENTS
    files = [os.path.join(SHAPES, v["weights"]) for v in manifest["components"].values()]
    total = sum(os.path.getsize(f) for f in files)
    assert total < 25 * 2 ** 20, f"the bundle is {total / 2 ** 20:.1f} MiB"
    assert sorted(os.listdir(SHAPES)) == sorted(["unclip.json"] + [os.path.basename(f)
                                                                   for f in files])
    from safetensors import safe_open
    decoder = os.path.join(SHAPES, manifest["components"]["decoder"]["weights"])
    with safe_open(decoder, "numpy") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} <= {"BF16", "I32", "BOOL"}
    sampling = manifest["sampling"]
    assert sampling["decoder"]["prediction_type"] == "v_prediction"
    assert [s["size"] for s in sampling["super_res"]] == [64, 128]


def test_bundle_generates_deterministic_images_of_its_captions(pipe):
    from unclip_jax.evaluate.shapes_judge import judge
    a = pipe.generate(PROMPTS, num_images=2, seed=0)
    assert a.shape == (4, 128, 128, 3) and a.dtype == np.uint8
    traces = dict(pipe.trace_counts)
    b = pipe.generate(PROMPTS, num_images=2, seed=0)
    np.testing.assert_array_equal(a, b)
    c = pipe.generate(PROMPTS, num_images=2, seed=1)
    assert pipe.trace_counts == traces       # the same shapes compile nothing new
    assert np.abs(a.astype(int) - c).mean() > 1.0
    prompts = [p for p in PROMPTS for _ in range(2)] * 2
    verdicts = [judge(im, p) for im, p in zip(np.concatenate([a, c]), prompts)]
    right = [sum(v.correct for v, q in zip(verdicts, prompts) if q == p) for p in PROMPTS]
    # of 4 images each (all 8 are right here; one miss is allowed for another CPU's rounding)
    assert sum(right) >= 7 and right[1] >= 3, [v.failed for v in verdicts]
