"""Shapes evaluation (unclip_jax.evaluate.shapes_eval) and `unclip-jax eval`.

The accounting is checked where the answer is known: a fake pipeline that returns the
ground-truth renders must score 100%, one that fails every two-object caption must score 0 there
and 100% on one-object captions, and diversity is counted on constructed scenes. The real path
runs on a tiny random pipeline folder (its accuracy is near 0; the structure is what is checked).
All tiny-pipeline calls use 4 prompts x 2 images (one row per simulated device), so they share
compiled stages."""
import math
import types

import numpy as np
import pytest

from pipeline_fixtures import tiny_pipeline
from unclip_jax import cli
from unclip_jax.data import shapes
from unclip_jax.evaluate import shapes_eval as se


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A random pipeline folder: tiny CLIP (both towers), diffusion and AR priors, a 32 x 32
    decoder (the judge's smallest size), 2 sampling steps."""
    path = tmp_path_factory.mktemp("eval") / "pipe"
    tiny_pipeline(path, ar_prior=True, settings={"prior": {"steps": 2}, "decoder": {"steps": 2}})
    return str(path)


@pytest.fixture(scope="module")
def pipe(folder):
    from unclip_jax.commands.apps import load_pipeline
    return load_pipeline(folder)    # the object `unclip-jax eval` reuses in this process


class FakePipe:
    """``generate`` returns a fixed image per caption and records its calls."""

    def __init__(self, images_by_caption, fail_two=False):
        self.images = images_by_caption
        self.fail_two = fail_two
        self.calls = []

    def generate(self, prompts, num_images=1, seed=0, **kwargs):
        self.calls.append((list(prompts), num_images, seed, kwargs))
        out = []
        for p in prompts:
            img = self.images[p]
            if self.fail_two and shapes.parse_caption(p).kind == "two":
                img = np.full_like(img, 240)   # background only: nothing found
            out += [img] * num_images
        return np.stack(out)


def _render(objects, relation=None):
    objs = tuple(shapes.Obj(c, s, size, x, y, shapes.SIZES[size]) for c, s, size, x, y in objects)
    scene = shapes.Scene(objs, shapes.caption_for(objs, relation), relation)
    return shapes.render(scene), scene.caption


# --------------------------------------------------------------------------------------------
# Captions, accounting, diversity
# --------------------------------------------------------------------------------------------

def test_test_captions_come_from_the_test_split():
    caps = se.test_captions(6, seed=0)
    _, scenes = shapes.generate(0, "test", 6)
    assert caps == [s.caption for s in scenes]
    assert se.test_captions(3, seed=0, start=3) == caps[3:]
    assert caps != [s.caption for s in shapes.generate(0, "train", 6)[1]]
    images, caps2 = se.test_set(4, seed=0, size=32)
    assert images.shape == (4, 32, 32, 3) and caps2 == caps[:4]
    # Reference images are brought to the generated size by an area (box) downsample.
    big, _ = se.test_set(4, seed=0)
    small = se._resize_like(big, (32, 32))
    assert small.shape == images.shape
    assert np.abs(small.astype(int) - images.astype(int)).max() <= 1
    with pytest.raises(se.EvalError, match="at least one"):
        se.test_captions(0)


def test_ground_truth_scores_100_percent_and_kinds_are_separated():
    images, caps = se.test_set(12, seed=0)
    kinds = [shapes.parse_caption(c).kind for c in caps]
    n_one = kinds.count("one")
    assert 0 < n_one < 12, "the first 12 test captions hold both kinds"
    fake = FakePipe(dict(zip(caps, images)))
    s = se.caption_accuracy(fake, caps, seed=3, num_images=2, batch_size=10,
                            decoder_settings={"steps": 7})
    assert s["accuracy"] == 1.0 and s["one/accuracy"] == 1.0 and s["two/accuracy"] == 1.0
    assert s["two/binding"] == 1.0 and s["one/position"] == 1.0 and s["two/relation"] == 1.0
    assert (s["n"], s["one/n"], s["two/n"]) == (24, 2 * n_one, 2 * (12 - n_one))
    assert (s["num_captions"], s["num_images"]) == (12, 2)
    # Identical samples: one layout per caption, diversity 0.
    assert s["two/diversity"] == 0.0 and s["two/layouts"] == 1.0
    assert s["images_per_s"] > 0 and s["seconds"] >= 0
    # 5 prompts x 2 images per call; the last call padded with its last caption; every call
    # gets its own seed and the generate keyword arguments.
    assert [len(c[0]) for c in fake.calls] == [5, 5, 5]
    assert fake.calls[-1][0] == caps[10:] + [caps[11]] * 3
    assert len({c[2] for c in fake.calls}) == 3
    assert all(c[1] == 2 and c[3] == {"decoder_settings": {"steps": 7}} for c in fake.calls)

    failing = FakePipe(dict(zip(caps, images)), fail_two=True)
    s = se.caption_accuracy(failing, caps, num_images=1, batch_size=32)
    assert s["one/accuracy"] == 1.0 and s["two/accuracy"] == 0.0
    assert math.isclose(s["accuracy"], n_one / 12)
    assert s["two/colours_present"] == 0.0 and s["two/binding"] == 0.0
    # One call holds all 12 captions; it is repeated once, warm, to time it.
    assert [len(c[0]) for c in failing.calls] == [12, 12] and failing.calls[0] == failing.calls[1]
    assert math.isnan(s["diversity"]), "one image per caption: no diversity to measure"


def test_diversity_counts_distinct_layouts():
    a, cap = _render([("red", "circle", "small", 0.20, 0.20),
                      ("blue", "square", "small", 0.20, 0.70)], "above")
    a2, cap2 = _render([("red", "circle", "small", 0.24, 0.17),
                        ("blue", "square", "small", 0.18, 0.74)], "above")
    b, cap3 = _render([("red", "circle", "small", 0.80, 0.30),
                       ("blue", "square", "small", 0.80, 0.80)], "above")
    assert cap == cap2 == cap3 == "a red circle above a blue square"
    assert se.layout(a) == se.layout(a2) == (("blue", "bottom left"), ("red", "top left"))
    assert se.layout(b) == (("blue", "bottom right"), ("red", "top right"))
    one, one_cap = _render([("green", "square", "large", 0.5, 0.5)])
    s = se.score_images(np.stack([a, a2, b, one, one, one]), [cap, one_cap], num_images=3)
    assert s["two/layouts"] == 2.0 and s["two/diversity"] == 0.5      # (2 - 1) / (3 - 1)
    assert s["one/layouts"] == 1.0 and s["one/diversity"] == 0.0
    assert s["diversity"] == 0.25 and s["accuracy"] == 1.0
    assert se.diversity([[1, 2, 3], [1, 1]]) == (0.5, 2.0)
    with pytest.raises(se.EvalError, match="caption-major"):
        se.score_images(np.stack([a, a2]), [cap, one_cap], num_images=3)
    with pytest.raises(shapes.CaptionParseError, match="a dog"):
        se.caption_accuracy(FakePipe({}), [cap, "a dog"])


# --------------------------------------------------------------------------------------------
# A tiny random pipeline, the table, the command
# --------------------------------------------------------------------------------------------

def test_caption_accuracy_on_a_tiny_pipeline(pipe):
    caps = se.test_captions(4)
    ref, _ = se.test_set(4)            # 128 x 128, as `unclip-jax eval` uses
    s = se.caption_accuracy(pipe, caps, seed=0, num_images=2, batch_size=8,
                            reference_images=ref, clip_metrics=True)
    kinds = [shapes.parse_caption(c).kind for c in caps]
    assert s["n"] == 8 and s["one/n"] + s["two/n"] == 8 and s["one/n"] == 2 * kinds.count("one")
    for key in ("accuracy", "one/accuracy", "two/accuracy", "two/binding", "two/diversity"):
        assert math.isnan(s[key]) or 0.0 <= s[key] <= 1.0, key
    assert s["images_per_s"] > 0
    assert 0.0 <= s["clip_score"] <= 100.0 and np.isfinite(s["fd_clip"]) and s["fd_clip"] >= 0
    table = se.summary_markdown(s)
    assert "| two objects: binding |" in table and "| CLIP score |" in table

    # Same seed, same images; another seed, others.
    x1, _ = se.generate_for_captions(pipe, caps, seed=1, num_images=2, batch_size=8)
    x2, _ = se.generate_for_captions(pipe, caps, seed=1, num_images=2, batch_size=8)
    x3, _ = se.generate_for_captions(pipe, caps, seed=2, num_images=2, batch_size=8)
    assert x1.shape == (8, 32, 32, 3) and x1.dtype == np.uint8
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)


def test_comparison_settings_and_table(pipe):
    full = se.comparison_settings(pipe, base={"prior_settings": {"steps": 2}})
    assert pipe.decoder.config.text_encoder == "clip"      # so the caption-token rows are there
    assert [(s.group, s.name) for s in full[:9]] == [
        ("prior", "diffusion"), ("prior", "ar"), ("prior", "none (decoder on z_t)"),
        ("prior best-of", "diffusion prior, best of 1"),
        ("prior best-of", "diffusion prior, best of 2"),
        ("decoder caption tokens", "with caption tokens"),
        ("decoder caption tokens", "without caption tokens (z_i and z_t only)"),
        ("decoder guidance", "1 (diffusion prior)"), ("decoder guidance", "3 (diffusion prior)")]
    assert len(full) == 3 + 2 + 2 + 4 + 3 * 3 and full[-1].name == "dpm++ 50 steps"
    assert full[1].kwargs == {"prior": "ar", "decoder_settings": {}}
    assert full[4].kwargs == {"prior": "diffusion", "prior_settings": {"steps": 2, "best_of": 2},
                              "decoder_settings": {}}
    assert full[6].kwargs["decoder_settings"] == {"caption_tokens": False}
    assert full[8].kwargs == {"prior": "diffusion", "prior_settings": {"steps": 2},
                              "decoder_settings": {"guidance_scale": 3.0}}
    assert full[-1].kwargs["decoder_settings"] == {"sampler": "dpm++", "steps": 50}
    with pytest.raises(se.EvalError, match="best_of must be at least 1"):
        se.comparison_settings(pipe, best_of=(0,))
    # The run below compiles only the DDIM decoder with and without caption tokens (guidance 8
    # is the default; the AR prior's sampling is the pipeline tests' business).
    settings = se.comparison_settings(pipe, priors=("diffusion", "none"), guidance_scales=(8,),
                                      samplers=("ddim",), steps=(2,), best_of=(),
                                      base={"prior_settings": {"steps": 2}})
    settings = [s for s in settings if s.group != "decoder caption tokens"] + [
        s for s in settings if s.name.startswith("without")]
    no_prior = types.SimpleNamespace(prior=None, ar_prior=object())
    assert [s.name for s in se.comparison_settings(no_prior, guidance_scales=(8,), samplers=(),
                                                   best_of=(2,))] == [
        "ar", "none (decoder on z_t)", "ar prior, best of 2", "8 (ar prior)"]

    table = se.comparison_table(pipe, se.test_captions(4), num_images=2, batch_size=8,
                                settings=settings)
    assert len(table.rows) == 5
    lines = table.markdown().splitlines()
    assert lines[0] == ("| comparison | setting | one-object acc | two-object acc | binding | "
                        "diversity (2 obj) | images/s |")
    assert len(lines) == 2 + 5 and lines[3].startswith("| prior | none (decoder on z_t) |")
    assert lines[5].startswith("| decoder sampler | ddim 2 steps |")
    assert lines[6].startswith("| decoder caption tokens | without caption tokens")
    assert all(line.count("|") == 8 for line in lines)
    with pytest.raises(se.EvalError, match="Unknown sampler"):
        se.comparison_settings(pipe, samplers=("euler",))


def _run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_command(folder, pipe, tmp_path, capsys):
    out_md = tmp_path / "reports" / "eval.md"
    rc, out, err = _run(capsys, "eval", "--checkpoint", folder, "--num-captions", 4,
                        "--num-images", 2, "--batch-size", 8, "--clip-metrics", "--table",
                        "--table-captions", 4, "--table-priors", "diffusion,none",
                        "--table-guidance", 8, "--table-samplers",
                        "ddim", "--table-steps", 2, "--table-best-of", 2, "--prior-steps", 2,
                        "--out", out_md)
    assert rc == 0, err
    assert "| one object: accuracy |" in out and "| two objects: binding |" in out
    assert "| FD-CLIP vs test images |" in out
    assert "| prior | none (decoder on z_t) |" in out
    assert "| decoder sampler | ddim 2 steps |" in out
    assert "| prior best-of | diffusion prior, best of 2 |" in out
    assert "| decoder caption tokens | without caption tokens" in out
    assert "4 Shapes test captions" in out
    assert "judged on the decoder's output" in out   # --table-upsample 0 by default
    assert out_md.read_text() in out

    rc, out, err = _run(capsys, "eval", "--checkpoint", folder, "--num-captions", 1,
                        "--clip-metrics")
    assert rc == 2 and "raise --num-captions" in err and len(err.strip().splitlines()) == 1
    rc, out, err = _run(capsys, "eval", "--checkpoint", str(tmp_path / "missing"))
    assert rc == 2 and len(err.strip().splitlines()) == 1
    rc, _, err = _run(capsys, "eval", "--checkpoint", folder, "--table-samplers", "euler")
    assert rc == 2 and "euler" in err
    # --upsamplers: refused without upsampling stages, or with the other reports
    rc, _, err = _run(capsys, "eval", "--checkpoint", folder, "--upsamplers")
    assert rc == 2 and "no upsampling stage" in err
    rc, _, err = _run(capsys, "eval", "--checkpoint", folder, "--upsamplers", "--table")
    assert rc == 2 and "separate eval" in err


def test_eval_upsamplers_command_on_the_bundled_model(tmp_path, capsys):
    out_md = tmp_path / "up.md"
    rc, out, err = _run(capsys, "eval", "--upsamplers", "--upsample", 1, "--num-captions", 2,
                        "--batch-size", 2, "--out", out_md)
    assert rc == 0, err
    assert "| true images at 32 px (box-downsampled) | 100.0% |" in out
    assert "| after upsampling stage 1 (64 px) |" in out and "stage 2" not in out
    assert out_md.read_text() in out


class FakeUpsamplerPipe:
    """Two upsampling stages: nearest-neighbour 2x, the second one blanks the image when
    ``blank`` (background grey: nothing found)."""

    def __init__(self, blank=False):
        from types import SimpleNamespace
        self.settings = {"super_res": [{"models": ["a"], "size": 64}, {"models": ["b"], "size": 128}]}
        self.super_res_models = {"a": None, "b": None}
        self.prior = self.ar_prior = None
        self.decoder = SimpleNamespace(config=SimpleNamespace(image_size=32))
        self.tokenizer = SimpleNamespace(context_length=24)
        self.blank = blank
        self.calls = []

    def upsample(self, images, rng=None, *, index=0):
        self.calls.append((index, images.shape))
        out = np.repeat(np.repeat(np.asarray(images), 2, axis=1), 2, axis=2)
        if self.blank and index == 1:
            out = np.full_like(out, 240 / 127.5 - 1.0)
        return out


def test_upsampler_accuracy_judges_each_stage_on_true_low_resolution_images():
    rows = se.upsampler_accuracy(FakeUpsamplerPipe(), 6, batch_size=4)
    assert [label for label, _ in rows] == [
        "true images at 32 px (box-downsampled)", "after upsampling stage 1 (64 px)",
        "after upsampling stage 2 (128 px)", "true images at 128 px"]
    assert all(s["accuracy"] == 1.0 for _, s in rows)
    pipe = FakeUpsamplerPipe(blank=True)
    rows = se.upsampler_accuracy(pipe, 6, batch_size=4)
    assert rows[1][1]["accuracy"] == 1.0 and rows[2][1]["accuracy"] == 0.0
    # every call has the batch's shape (the last one padded), each stage sees the one before
    assert pipe.calls == [(0, (4, 32, 32, 3))] * 2 + [(1, (4, 64, 64, 3))] * 2
    table = se.upsampler_markdown(rows)
    assert "| after upsampling stage 2 (128 px) | 0.0% |" in table
    assert len(se.upsampler_accuracy(pipe, 2, upsample=1)) == 3
    with pytest.raises(se.EvalError, match="has 2 upsampling stage"):
        se.upsampler_accuracy(pipe, 2, upsample=3)
