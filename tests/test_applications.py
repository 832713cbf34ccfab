"""The unCLIP applications (variations, interpolation, text diffs, the typographic probe) and
their commands, on a tiny random pipeline written with UnCLIPPipeline.save_pretrained.

Batch sizes are kept to 1 and 3 throughout so that the compiled stages are shared between tests
(the commands reuse the pipeline that load_pipeline caches per folder)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unclip_jax import applications as apps
from unclip_jax import cli, clip
from unclip_jax.commands import apps as apps_cmd
from unclip_jax.pipeline import to_uint8

STEPS = 6      # DDIM steps of every decoder loop here
N = 3          # variations, frames, thetas, reconstructions
REFINE = 6     # fixed-point iterations of every inversion here (converged for this model)


def _randomize_outputs(module, seed, scale):
    """The zero-initialised parameters (the output convolutions, the null z_i) made random, so
    the decoder's noise prediction depends on its inputs. Kept small: a random UNet's
    prediction is far less smooth in x than a trained one's, and the fixed-point refinement of
    DDIM inversion converges only where it is smooth enough."""
    graphdef, state = nnx.split(module)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [x if np.any(np.asarray(x)) else
              jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from unclip_jax.models.decoder import Decoder, DecoderConfig
    from unclip_jax.models.upsampler import SuperRes, SuperResConfig
    from unclip_jax.pipeline import UnCLIPPipeline
    model = clip.CLIP(clip.get_preset("tiny"), rngs=nnx.Rngs(0))   # 64-dim, 32 x 32 images
    dec = Decoder(DecoderConfig(image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                                attention_levels=(1,), head_dim=8, groups=4, clip_dim=64,
                                context_dim=16, text_width=64), nnx.Rngs(1))
    sr = SuperRes(SuperResConfig(channels=8, channel_mult=(1, 2), num_res_blocks=1, groups=4),
                  nnx.Rngs(2))
    settings = {"decoder": {"steps": 3, "guidance_scale": 3.0},
                "super_res": [{"models": ["super_res_first"], "size": 32, "steps": 2}]}
    pipe = UnCLIPPipeline(clip=model, decoder=_randomize_outputs(dec, 3, 3e-3), settings=settings,
                          super_res={"super_res_first": _randomize_outputs(sr, 4, 3e-3)})
    path = tmp_path_factory.mktemp("apps") / "pipe"
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pipe(folder):
    return apps_cmd.load_pipeline(folder)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two smooth test images of different sizes (a blob on a gradient), and their files."""
    yy, xx = np.mgrid[0:40, 0:48] / 40.0
    a = np.stack([200 * xx, 120 + 80 * yy, 90 + 0 * xx], -1)
    a[(yy - 0.5) ** 2 + (xx - 0.6) ** 2 < 0.06] = (30, 70, 220)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    b = np.stack([60 + 150 * yy, 200 - 100 * xx, 40 + 150 * xx * yy], -1)
    a, b = a.clip(0, 255).astype(np.uint8), b.clip(0, 255).astype(np.uint8)
    d = tmp_path_factory.mktemp("images")
    Image.fromarray(a).save(d / "a.png")
    Image.fromarray(b).save(d / "b.png")
    (d / "broken.png").write_bytes(b"not a png at all")
    return a, b, str(d)


def _levels(x, y):
    """Largest difference between two uint8 images, in grey levels."""
    return int(np.abs(x.astype(int) - y.astype(int)).max())


# --------------------------------------------------------------------------------------------
# slerp
# --------------------------------------------------------------------------------------------

def test_slerp_endpoints_norm_and_nearly_parallel_vectors():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 64)).astype(np.float32)
    b *= np.linalg.norm(a) / np.linalg.norm(b)               # equal norms
    thetas = np.array([0.0, 0.25, 0.5, 1.0])
    z = np.asarray(apps.slerp(a, b, thetas))
    assert z.shape == (4, 64)
    np.testing.assert_array_equal(z[0], a)                    # exact, not just close
    np.testing.assert_array_equal(z[-1], b)
    np.testing.assert_allclose(np.linalg.norm(z, axis=-1), np.linalg.norm(a), rtol=1e-5)
    # Angles advance linearly with theta along the great circle.
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    omega = np.arccos(unit(a) @ unit(b))
    for t, v in zip(thetas, z):
        assert abs(np.arccos(np.clip(unit(a) @ unit(v), -1, 1)) - t * omega) < 1e-3
    # A scalar theta gives one vector; batched rows are interpolated row by row.
    np.testing.assert_allclose(np.asarray(apps.slerp(a, b, 0.5)), z[2], rtol=1e-6)
    rows = np.asarray(apps.slerp(np.stack([a, b]), np.stack([b, a]), 0.25))
    np.testing.assert_allclose(rows[0], z[1], rtol=1e-5, atol=1e-6)
    # Identical and nearly parallel vectors: finite, the (linear) limit of the formula.
    np.testing.assert_allclose(np.asarray(apps.slerp(a, a, 0.3)), a, rtol=1e-6)
    c = a + 1e-6 * rng.normal(size=64).astype(np.float32)
    mid = np.asarray(apps.slerp(a, c, 0.5))
    assert np.all(np.isfinite(mid)) and np.abs(mid - (a + c) / 2).max() < 1e-5
    # Vectors of different norms: the norm moves between them (no blow-up), endpoints exact.
    z2 = np.asarray(apps.slerp(a, 3 * b, jnp.linspace(0, 1, 5)))
    np.testing.assert_array_equal(z2[-1], 3 * b)
    assert np.all(np.diff(np.linalg.norm(z2, axis=-1)) > 0)
    with pytest.raises(ValueError, match="one shape"):
        apps.slerp(a, b[:3], 0.5)


# --------------------------------------------------------------------------------------------
# Inversion and the applications
# --------------------------------------------------------------------------------------------

def test_ddim_inversion_round_trip(pipe, images):
    """DDIM (eta 0) from the inverted latent reproduces the image: to float32 rounding with
    enough fixed-point refinement, only roughly without (first-order error)."""
    a = images[0]
    x0 = jnp.asarray(apps.decoder_input(pipe, [a]))
    assert x0.shape == (1, 16, 16, 3) and -1 <= float(x0.min()) and float(x0.max()) <= 1
    zi = apps.image_embeds(pipe, [a])
    err = {}
    for refine in (0, REFINE):
        x_T = apps.invert(pipe, x0, zi, steps=STEPS, refine_iters=refine)
        rec = apps.ddim_decode(pipe, zi, x_T, steps=STEPS)
        err[refine] = float(jnp.abs(rec - x0).max())
    assert err[REFINE] < 1e-3 and err[0] > 30 * err[REFINE], err
    # The latent is not the image (it is scaled down by sqrt(alphas_cumprod) and noised).
    assert float(jnp.abs(x_T - x0).mean()) > 0.1
    # Another z_i decodes the same latent to another image.
    other = apps.ddim_decode(pipe, apps.image_embeds(pipe, [images[1]]), x_T, steps=STEPS)
    assert float(jnp.abs(other - x0).max()) > 1e-2


def test_variations_shapes_determinism_and_eta0_reconstruction(pipe, images):
    a = images[0]
    out = apps.variations(pipe, a, N, seed=0, eta=1.0, steps=STEPS, refine_iters=REFINE)
    assert out.images.shape == (N, 32, 32, 3) and out.images.dtype == np.uint8
    assert out.decoded.shape == (N, 16, 16, 3)
    assert out.image_embed.shape == (64,) and out.x_T.shape == (16, 16, 3)
    assert _levels(out.decoded[0], out.decoded[1]) > 10     # each call a different image
    again = apps.variations(pipe, a, N, seed=0, eta=1.0, steps=STEPS, refine_iters=REFINE)
    np.testing.assert_array_equal(again.images, out.images)
    other = apps.variations(pipe, a, N, seed=1, eta=1.0, steps=STEPS, refine_iters=REFINE)
    assert _levels(other.decoded[0], out.decoded[0]) > 10
    # eta = 0 gives back the input at the decoder's resolution.
    rec = apps.reconstruct(pipe, a, steps=STEPS, refine_iters=REFINE)
    target = to_uint8(apps.decoder_input(pipe, [a]))
    assert rec.decoded.shape == (1, 16, 16, 3) and _levels(rec.decoded[0], target[0]) <= 1
    assert rec.images.shape == (1, 32, 32, 3)
    # The eta = 1 variations keep the latent but not the pixels.
    assert _levels(out.decoded[0], target[0]) > 10


@pytest.mark.parametrize("mode", ["slerp_latent", "fixed"])
def test_interpolation(pipe, images, mode):
    a, b = images[:2]
    out = apps.interpolate(pipe, a, b, N, seed=0, mode=mode, steps=STEPS, refine_iters=REFINE)
    assert out.frames.shape == (N, 32, 32, 3) and out.decoded.shape == (N, 16, 16, 3)
    np.testing.assert_array_equal(out.thetas, [0.0, 0.5, 1.0])
    assert not np.array_equal(out.decoded[0], out.decoded[-1])
    rec_a, rec_b = (apps.reconstruct(pipe, im, steps=STEPS, refine_iters=REFINE).decoded[0] for im in (a, b))
    if mode == "slerp_latent":
        # The trajectory's ends reconstruct the inputs (same latents, same z_i).
        assert _levels(out.decoded[0], rec_a) <= 1 and _levels(out.decoded[-1], rec_b) <= 1
    else:
        # One random latent for all frames: the ends are new images, not the inputs, and the
        # frames differ only through z_i (which this tiny random decoder barely reads).
        assert _levels(out.decoded[0], rec_a) > 10 and _levels(out.decoded[-1], rec_b) > 10
        assert _levels(out.decoded[0], out.decoded[-1]) < 10
        again = apps.interpolate(pipe, a, b, N, seed=0, mode=mode, steps=STEPS, refine_iters=REFINE)
        np.testing.assert_array_equal(again.frames, out.frames)
        batched = apps.interpolate(pipe, a, b, N, seed=0, mode=mode, steps=STEPS,
                                   refine_iters=REFINE, batch_size=2)
        assert _levels(batched.frames, out.frames) <= 1   # frames 0-1, then 2: the same frames


def test_textdiff_theta0_is_the_reconstruction(pipe, images):
    a = images[0]
    out = apps.textdiff(pipe, a, "a blue circle", "a red square", (0.0, 0.5, 1.0), steps=STEPS, refine_iters=REFINE)
    assert out.images.shape == (N, 32, 32, 3) and out.text_diff.shape == (64,)
    rec = apps.reconstruct(pipe, a, steps=STEPS, refine_iters=REFINE)
    # Same z_i, same latent, same upsampler noise: the same image (up to rounding).
    assert _levels(out.decoded[0], rec.decoded[0]) <= 1
    assert _levels(out.images[0], rec.images[0]) <= 1
    assert not np.array_equal(out.decoded[2], out.decoded[0])
    # z_d is the normalised caption difference, at the norm of z_i.
    text = pipe.encode_text(["a blue circle", "a red square"]).text_embed
    d = np.asarray(text[1] - text[0])
    np.testing.assert_allclose(out.text_diff, d / np.linalg.norm(d) * np.linalg.norm(rec.image_embed),
                               rtol=1e-4)


def test_probe_probabilities_and_reconstructions(pipe, images):
    a = images[0]
    labels = ["a blue circle", "a green triangle", "a photo of a dog"]
    out = apps.probe(pipe, a, labels, N, seed=0)
    assert out.images.shape == (N, 32, 32, 3) and out.decoded.shape == (N, 16, 16, 3)
    assert out.probs.shape == (3,) and abs(float(out.probs.sum()) - 1.0) < 1e-5
    # Recomputed here with CLIP directly: softmax(exp(logit_scale) * cosine).
    pixels = clip.preprocess(a, image_size=pipe.clip.config.image_size)
    zi = np.asarray(pipe.clip.encode_image(jnp.asarray(pixels)))[0]
    zt = np.asarray(pipe.clip.encode_text(jnp.asarray(pipe.tokenizer(labels).ids))[0])
    cos = zt @ zi / np.linalg.norm(zt, axis=-1) / np.linalg.norm(zi)
    logits = min(np.exp(float(pipe.clip.logit_scale[...])), 100.0) * cos
    np.testing.assert_allclose(out.cosine, cos, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.probs, np.exp(logits) / np.exp(logits).sum(), rtol=1e-3)
    flat = apps.zero_shot(pipe, zi, labels, logit_scale=1e-6)[0]  # a cold softmax is uniform
    np.testing.assert_allclose(flat, 1 / 3, rtol=1e-4)
    assert _levels(out.decoded[0], out.decoded[1]) > 10


def test_clear_errors(pipe, images, tmp_path):
    a, b, d = images
    with pytest.raises(apps.ApplicationError, match="source caption is empty"):
        apps.textdiff(pipe, a, "  ", "a red square")
    with pytest.raises(apps.ApplicationError, match="same CLIP text embedding"):
        apps.textdiff(pipe, a, "a red square", "a red square")
    with pytest.raises(apps.ApplicationError, match=r"theta must lie in \[0, 1\]"):
        apps.textdiff(pipe, a, "a", "b", (0.0, 1.5))
    with pytest.raises(apps.ApplicationError, match="mode must be one of"):
        apps.interpolate(pipe, a, b, mode="linear")
    with pytest.raises(apps.ApplicationError, match="at least 2"):
        apps.interpolate(pipe, a, b, 1)
    with pytest.raises(apps.ApplicationError, match="at least one label"):
        apps.probe(pipe, a, [])
    with pytest.raises(apps.ApplicationError, match="does not exist"):
        apps.load_image(tmp_path / "missing.png")
    with pytest.raises(apps.ApplicationError, match="cannot be read as an image"):
        apps.load_image(os.path.join(d, "broken.png"))
    np.testing.assert_array_equal(apps.load_image(os.path.join(d, "a.png")), a)


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------

def run(capsys, *argv):
    rc = cli.main([str(x) for x in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_commands_write_pngs(folder, images, tmp_path, capsys):
    _, _, d = images
    a, b = os.path.join(d, "a.png"), os.path.join(d, "b.png")
    common = ["--checkpoint", folder, "--decoder-steps", STEPS, "--refine-iters", REFINE]
    rc, out, err = run(capsys, "vary", "--image", a, "--num-images", N, *common,
                       "--out", tmp_path / "vary")
    assert rc == 0, err
    names = sorted(os.listdir(tmp_path / "vary"))
    assert names == ["variation_00.png", "variation_01.png", "variation_02.png", "variations.png"]
    assert "wrote 4 file(s)" in out and str(tmp_path / "vary" / "variations.png") in out
    with Image.open(tmp_path / "vary" / "variation_01.png") as im:
        assert im.size == (32, 32)
        assert im.text["command"] == "vary" and im.text["image"] == a and im.text["seed"] == "0"
        assert im.text["model"] == os.path.abspath(folder)
        settings = json.loads(im.text["settings"])
        assert settings["decoder_steps"] == STEPS and settings["eta"] == 1.0
    with Image.open(tmp_path / "vary" / "variations.png") as im:   # input + 3, 2-pixel gaps
        assert im.size == (round(48 * 32 / 40) + 3 * 32 + 3 * 2, 32)

    rc, out, err = run(capsys, "interpolate", "--image", a, "--image", b, "--frames", N,
                       "--mode", "slerp_latent", *common, "--out", tmp_path / "interp")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "interp")) == [
        "frame_00.png", "frame_01.png", "frame_02.png", "interpolation.png"]
    api = apps.interpolate(apps_cmd.load_pipeline(folder), images[0], images[1], N,
                           mode="slerp_latent", steps=STEPS, refine_iters=REFINE)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "interp" / "frame_02.png")),
                                  api.frames[2])

    rc, out, err = run(capsys, "textdiff", "--image", a, "--caption", "a blue circle",
                       "--target", "a red square", "--thetas", "0,0.5,1", *common,
                       "--out", tmp_path / "td")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path / "td")) == [
        "textdiff.png", "theta_0.00.png", "theta_0.50.png", "theta_1.00.png"]
    with Image.open(tmp_path / "td" / "theta_0.50.png") as im:
        assert json.loads(im.text["prompt"]) == ["a blue circle", "a red square"]

    rc, out, err = run(capsys, "probe", "--image", a, "--label", "a blue circle", "--label",
                       "a photo of a dog", "--reconstructions", N, "--checkpoint", folder,
                       "--out", tmp_path / "probe")
    assert rc == 0, err
    assert "CLIP zero-shot probabilities" in out and "a photo of a dog" in out
    with open(tmp_path / "probe" / "probe.json") as f:
        result = json.load(f)
    assert result["labels"] == ["a blue circle", "a photo of a dog"]
    assert abs(sum(result["probs"]) - 1) < 1e-5
    assert len([n for n in os.listdir(tmp_path / "probe") if n.startswith("reconstruction_")]) == N


def test_commands_refuse_bad_input_in_one_line(folder, images, tmp_path, capsys, monkeypatch):
    import unclip_jax.assets
    monkeypatch.setattr(unclip_jax.assets, "SHAPES", str(tmp_path / "no_bundle"))
    _, _, d = images
    a = os.path.join(d, "a.png")
    out = ["--out", tmp_path / "o"]
    cases = [
        (["vary", "--image", a, "--checkpoint", tmp_path / "nowhere"], "does not exist"),
        (["vary", "--image", a], "bundled Shapes model is missing"),
        (["vary", "--image", tmp_path / "missing.png", "--checkpoint", folder], "does not exist"),
        (["probe", "--image", os.path.join(d, "broken.png"), "--label", "x", "--checkpoint",
          folder], "cannot be read as an image"),
        (["textdiff", "--image", a, "--caption", " ", "--target", "a dog", "--checkpoint", folder],
         "--caption is empty"),
        (["textdiff", "--image", a, "--caption", "a", "--target", "b", "--thetas", "0,2",
          "--checkpoint", folder], "--thetas must be"),
        (["interpolate", "--image", a, "--checkpoint", folder], "exactly two images"),
        (["probe", "--image", a, "--label", "", "--checkpoint", folder], "--label number 1"),
    ]
    for argv, message in cases:
        rc, _, err = run(capsys, *argv, *out)
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("command,flags", [
    ("vary", ["--image", "--checkpoint", "--num-images", "--seed", "--eta", "--decoder-steps",
              "--refine-iters", "--decoder-guidance", "--upsample", "--out"]),
    ("interpolate", ["--image", "--frames", "--mode", "slerp_latent", "--out"]),
    ("textdiff", ["--image", "--caption", "--target", "--thetas", "--out"]),
    ("probe", ["--image", "--label", "--reconstructions", "--logit-scale", "--decoder-steps",
               "--decoder-guidance", "--out"]),
])
def test_command_help(command, flags, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in flags:
        assert flag in text, flag
