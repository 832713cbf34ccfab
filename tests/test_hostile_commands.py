"""Hostile inputs to the generation-side commands (generate, vary, interpolate, textdiff, probe,
embed, tokenize, eval, shapes, demo, config) and to the image reader and the pipeline API.

Each command case is refused in one line, exit status 2, before any model is loaded (so the cases
are cheap), and every file that was in the output folder before is unchanged. Positive cases:
--overwrite replaces only the files a command writes; a 16-bit PNG reads as its 8-bit version.
"""
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from hostile import assert_refused, run_cli, snapshot
from pipeline_fixtures import tiny_pipeline
from unclip_jax.assets import SHAPES

LONG = "red " * 300            # far beyond any CLIP context
BIG = str(2 ** 64)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(array: np.ndarray, bits: int = 8, size=None) -> bytes:
    """A PNG of ``array`` ([H, W, C], C in 1..4) at ``bits`` per sample; ``size`` (w, h)
    overrides the header's size (a lying header)."""
    h, w, c = array.shape
    kind = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    dtype = ">u2" if bits == 16 else "u1"
    rows = b"".join(b"\x00" + array[y].astype(dtype).tobytes() for y in range(h))
    w, h = size or (w, h)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bits, kind, 0,
                                                              0, 0))
            + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder of inputs and an output folder ``user`` holding a user's files."""
    root = tmp_path_factory.mktemp("hostile_commands")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(root / "img.png")
    Image.fromarray(img[::-1]).save(root / "b.png")
    (root / "text.png").write_text("not an image at all")
    (root / "empty.png").write_bytes(b"")
    good = (root / "img.png").read_bytes()
    (root / "truncated.png").write_bytes(good[:len(good) // 2])
    (root / "bomb.png").write_bytes(png_bytes(img[:1, :1], size=(60000, 60000)))
    (root / "folder.png").mkdir()
    (root / "afile").write_text("a user's file")
    user = root / "user"
    user.mkdir()
    for name in ("0_0.png", "grid.png", "variation_00.png", "frame_00.png", "theta_0.00.png",
                 "probe.json", "demo_clip.png", "notes.txt"):
        (user / name).write_bytes(b"user data " + name.encode())
    (user / "existing.npz").write_bytes(b"user npz")
    (user / "report.md").write_text("user report")
    manifest = json.loads(open(os.path.join(SHAPES, "unclip.json"), encoding="utf-8").read())
    for name, edit in (("bad_steps", lambda m: m["sampling"]["decoder"].update(steps="many")),
                       ("bad_guidance", lambda m: m["sampling"]["prior"].update(
                           guidance_scale=float("nan"))),
                       ("bad_context", lambda m: m.setdefault("tokenizer", {}).update(
                           context_length=10 ** 9)),
                       ("bad_sampling", lambda m: m.update(sampling=[1, 2]))):
        m = json.loads(json.dumps(manifest))
        edit(m)
        (root / name).mkdir()
        (root / name / "unclip.json").write_text(json.dumps(m))
    (root / "clashing").mkdir()
    (root / "clashing" / "0_0.png").mkdir()
    return root


def _cases():
    """(id, argv with {w} for the work folder, what the line must say)."""
    g = ["generate", "--prompt", "a red circle", "--out", "{w}/new_out"]
    v = ["vary", "--image", "{w}/img.png", "--out", "{w}/new_out"]
    i = ["interpolate", "--image", "{w}/img.png", "--image", "{w}/b.png", "--out", "{w}/new_out"]
    t = ["textdiff", "--image", "{w}/img.png", "--caption", "a red circle", "--target",
         "a blue square", "--out", "{w}/new_out"]
    p = ["probe", "--image", "{w}/img.png", "--label", "a red circle", "--out", "{w}/new_out"]
    e = ["eval", "--num-captions", "2"]
    return [
        # generate: numbers
        ("gen-guidance-nan", g + ["--decoder-guidance", "nan"], "finite"),
        ("gen-guidance-inf", g + ["--decoder-guidance", "inf"], "finite"),
        ("gen-prior-guidance--inf", g + ["--prior-guidance=-inf"], "finite"),
        ("gen-guidance-negative", g + ["--decoder-guidance", "-1"], "--decoder-guidance"),
        ("gen-guidance-huge", g + ["--decoder-guidance", "1e300"], "--decoder-guidance"),
        ("gen-guidance-word", g + ["--decoder-guidance", "lots"], "number"),
        ("gen-upsample-negative", g + ["--upsample", "-1"], "--upsample"),
        ("gen-upsample-too-many", g + ["--upsample", "3"], "upsampling stage"),
        ("gen-num-images-0", g + ["--num-images", "0"], "--num-images"),
        ("gen-num-images-negative", g + ["--num-images", "-5"], "--num-images"),
        ("gen-num-images-word", g + ["--num-images", "many"], "integer"),
        ("gen-num-images-huge", g + ["--num-images", "1000000"], "memory"),
        ("gen-num-images-beyond-cap", g + ["--num-images", "1000000000"], "at most"),
        ("gen-many-prompts-times-images", g + ["--prompt", "b", "--num-images", "600000"],
         "images"),
        ("gen-seed-negative", g + ["--seed", "-1"], "--seed"),
        ("gen-seed-2**64", g + ["--seed", BIG], "--seed"),
        ("gen-seed-float", g + ["--seed", "1.5"], "integer"),
        ("gen-prior-steps-0", g + ["--prior-steps", "0"], "--prior-steps"),
        ("gen-decoder-steps-0", g + ["--decoder-steps", "0"], "--decoder-steps"),
        ("gen-decoder-steps-huge", g + ["--decoder-steps", "5000"], "steps"),
        ("gen-prior-steps-huge", g + ["--prior-steps", "100000"], "steps"),
        ("gen-super-res-steps-0", g + ["--super-res-steps", "0"], "--super-res-steps"),
        ("gen-super-res-start-negative", g + ["--super-res-start", "-1"], "--super-res-start"),
        ("gen-super-res-start-huge", g + ["--super-res-start", "5000"], "start_t"),
        ("gen-best-of-0", g + ["--best-of", "0"], "--best-of"),
        ("gen-best-of-huge", g + ["--best-of", "100000"], "--best-of"),
        ("gen-batch-size-0", g + ["--batch-size", "0"], "--batch-size"),
        ("gen-prior-none-steps", g + ["--prior", "none", "--prior-steps", "3"], "does not apply"),
        ("gen-prior-none-best-of", g + ["--prior", "none", "--best-of", "2"], "does not apply"),
        ("gen-prior-ar-steps", g + ["--prior", "ar", "--prior-steps", "3"], "does not apply"),
        ("gen-sampler-unknown", g + ["--decoder-sampler", "euler"], "invalid choice"),
        # generate: prompts
        ("gen-prompt-empty", ["generate", "--prompt", "", "--out", "{w}/new_out"], "empty"),
        ("gen-prompt-blank", ["generate", "--prompt", " \t\n", "--out", "{w}/new_out"], "empty"),
        ("gen-prompt-second-empty", g + ["--prompt", ""], "number 2"),
        ("gen-prompt-control", ["generate", "--prompt", "\x01\x02\x7f", "--out", "{w}/new_out"],
         "empty once cleaned"),
        ("gen-prompt-long", ["generate", "--prompt", LONG, "--out", "{w}/new_out"],
         ("tokens long", "--truncate")),
        ("gen-prompt-one-huge-word", ["generate", "--prompt", "qzxv" * 250_000, "--out",
                                      "{w}/new_out"], "more than 22 tokens"),
        ("gen-prompt-not-utf8", ["generate", "--prompt", "a \udcff", "--out", "{w}/new_out"],
         "not valid text"),
        ("gen-no-prompt", ["generate", "--out", "{w}/new_out"], "--prompt"),
        # generate: where it writes
        ("gen-out-is-file", ["generate", "--prompt", "a", "--out", "{w}/afile"], "is a file"),
        ("gen-out-under-file", ["generate", "--prompt", "a", "--out", "{w}/afile/sub"],
         "is a file"),
        ("gen-out-has-images", ["generate", "--prompt", "a", "--out", "{w}/user"],
         ("already has", "--overwrite")),
        ("gen-out-name-is-folder", ["generate", "--prompt", "a", "--out", "{w}/clashing",
                                    "--overwrite"], "is a folder"),
        ("gen-grid-exists", g + ["--grid", "{w}/user/grid.png"], ("already exists",
                                                                 "--overwrite")),
        ("gen-grid-is-folder", g + ["--grid", "{w}/user"], "is a folder"),
        ("gen-grid-under-file", g + ["--grid", "{w}/afile/grid.png"], "is a file"),
        ("gen-grid-is-an-image", ["generate", "--prompt", "a", "--out", "{w}/new_out", "--grid",
                                  "{w}/new_out/0_0.png"], "one of the images"),
        ("gen-out-empty", ["generate", "--prompt", "a", "--out", ""], "empty"),
        ("gen-grid-empty", g + ["--grid", ""], "--grid is empty"),
        ("gen-checkpoint-empty", g + ["--checkpoint", ""], "--checkpoint is empty"),
        ("vary-checkpoint-empty", v + ["--checkpoint", " "], "--checkpoint is empty"),
        ("eval-checkpoint-empty", ["eval", "--checkpoint", ""], "--checkpoint is empty"),
        ("embed-clip-empty", ["embed", "--text", "a", "--clip", ""], "--clip is empty"),
        ("gen-checkpoint-missing", g + ["--checkpoint", "{w}/nothing"], "does not exist"),
        ("gen-checkpoint-file", g + ["--checkpoint", "{w}/afile"], "is a file"),
        ("gen-manifest-steps-word", g + ["--checkpoint", "{w}/bad_steps"], "integer"),
        ("gen-manifest-guidance-nan", g + ["--checkpoint", "{w}/bad_guidance"], "NaN"),
        ("gen-manifest-context-huge", g + ["--checkpoint", "{w}/bad_context"], "context_length"),
        ("gen-manifest-sampling-list", g + ["--checkpoint", "{w}/bad_sampling"], "sampling"),
        ("vary-manifest-steps-word", v + ["--checkpoint", "{w}/bad_steps"], "integer"),
        ("eval-manifest-guidance-nan", ["eval", "--checkpoint", "{w}/bad_guidance"], "NaN"),
        ("gen-config-override", g + ["--config.seed=3"], "config"),
        # vary
        ("vary-eta-nan", v + ["--eta", "nan"], "finite"),
        ("vary-eta-inf", v + ["--eta", "inf"], "finite"),
        ("vary-eta-negative", v + ["--eta", "-0.5"], "--eta"),
        ("vary-eta-huge", v + ["--eta", "1e9"], "--eta"),
        ("vary-image-missing", ["vary", "--image", "{w}/none.png", "--out", "{w}/new_out"],
         "does not exist"),
        ("vary-image-folder", ["vary", "--image", "{w}/folder.png", "--out", "{w}/new_out"],
         "is a folder"),
        ("vary-image-device", ["vary", "--image", "/dev/null", "--out", "{w}/new_out"],
         "not a regular file"),
        ("vary-image-text", ["vary", "--image", "{w}/text.png", "--out", "{w}/new_out"],
         "cannot be read"),
        ("vary-image-empty", ["vary", "--image", "{w}/empty.png", "--out", "{w}/new_out"],
         "cannot be read"),
        ("vary-image-truncated", ["vary", "--image", "{w}/truncated.png", "--out",
                                  "{w}/new_out"], "cannot be read"),
        ("vary-image-bomb", ["vary", "--image", "{w}/bomb.png", "--out", "{w}/new_out"],
         ("60000x60000", "--max-image-pixels")),
        ("vary-max-pixels-small", v + ["--max-image-pixels", "100"], "more than the 100"),
        ("vary-max-pixels-0", v + ["--max-image-pixels", "0"], "--max-image-pixels"),
        ("vary-num-images-0", v + ["--num-images", "0"], "--num-images"),
        ("vary-num-images-huge", v + ["--num-images", "1000000"], "memory"),
        ("vary-refine-negative", v + ["--refine-iters", "-1"], "--refine-iters"),
        ("vary-refine-huge", v + ["--refine-iters", "100000"], "--refine-iters"),
        ("vary-steps-0", v + ["--decoder-steps", "0"], "--decoder-steps"),
        ("vary-steps-huge", v + ["--decoder-steps", "5000"], "steps"),
        ("vary-upsample-negative", v + ["--upsample", "-1"], "--upsample"),
        ("vary-upsample-too-many", v + ["--upsample", "7"], "upsampling stage"),
        ("vary-seed-2**64", v + ["--seed", BIG], "--seed"),
        ("vary-guidance-nan", v + ["--decoder-guidance", "nan"], "finite"),
        ("vary-batch-size-0", v + ["--batch-size", "0"], "--batch-size"),
        ("vary-caption-long", v + ["--decoder-caption", LONG], ("tokens long", "--truncate")),
        ("vary-out-has-files", ["vary", "--image", "{w}/img.png", "--out", "{w}/user"],
         "already has"),
        ("vary-out-empty", ["vary", "--image", "{w}/img.png", "--out", " "], "empty"),
        ("vary-out-is-file", ["vary", "--image", "{w}/img.png", "--out", "{w}/afile"],
         "is a file"),
        # interpolate
        ("interp-one-image", ["interpolate", "--image", "{w}/img.png", "--out", "{w}/new_out"],
         "exactly two"),
        ("interp-three-images", i + ["--image", "{w}/img.png"], "exactly two"),
        ("interp-frames-1", i + ["--frames", "1"], "--frames"),
        ("interp-frames-negative", i + ["--frames", "-3"], "--frames"),
        ("interp-frames-huge", i + ["--frames", "1000000"], "memory"),
        ("interp-mode-unknown", i + ["--mode", "linear"], "invalid choice"),
        ("interp-bad-second-image", ["interpolate", "--image", "{w}/img.png", "--image",
                                     "{w}/text.png", "--out", "{w}/new_out"], "cannot be read"),
        ("interp-out-has-frames", ["interpolate", "--image", "{w}/img.png", "--image",
                                   "{w}/b.png", "--out", "{w}/user"], "already has"),
        # textdiff
        ("td-thetas-nan", t + ["--thetas", "0,nan"], "--thetas"),
        ("td-thetas-inf", t + ["--thetas", "inf"], "--thetas"),
        ("td-thetas-above-1", t + ["--thetas", "0,2"], "--thetas"),
        ("td-thetas-negative", t + ["--thetas", "-0.5"], "--thetas"),
        ("td-thetas-words", t + ["--thetas", "a,b"], "--thetas"),
        ("td-thetas-empty", t + ["--thetas", ","], "--thetas"),
        ("td-thetas-same-file", t + ["--thetas", "0.001,0.002"], "same file"),
        ("td-caption-empty", ["textdiff", "--image", "{w}/img.png", "--caption", " ", "--target",
                              "b", "--out", "{w}/new_out"], "--caption"),
        ("td-target-long", ["textdiff", "--image", "{w}/img.png", "--caption", "a", "--target",
                            LONG, "--out", "{w}/new_out"], ("--target", "--truncate")),
        ("td-out-has-theta", ["textdiff", "--image", "{w}/img.png", "--caption", "a",
                              "--target", "b", "--thetas", "0", "--out", "{w}/user"],
         "already has"),
        # probe
        ("probe-label-empty", ["probe", "--image", "{w}/img.png", "--label", "",
                               "--out", "{w}/new_out"], "--label"),
        ("probe-label-long", p + ["--label", LONG], ("--label", "--truncate")),
        ("probe-reconstructions-negative", p + ["--reconstructions", "-1"], "--reconstructions"),
        ("probe-logit-scale-nan", p + ["--logit-scale", "nan"], "finite"),
        ("probe-logit-scale-negative", p + ["--logit-scale", "-1"], "--logit-scale"),
        ("probe-decoder-steps-0", p + ["--decoder-steps", "0"], "--decoder-steps"),
        ("probe-image-bomb", ["probe", "--image", "{w}/bomb.png", "--label", "a", "--out",
                              "{w}/new_out"], "pixels"),
        ("probe-out-has-json", ["probe", "--image", "{w}/img.png", "--label", "a",
                                "--reconstructions", "0", "--out", "{w}/user"], "probe.json"),
        # embed
        ("embed-nothing", ["embed"], "nothing to embed"),
        ("embed-image-text", ["embed", "--image", "{w}/text.png"], "cannot be read"),
        ("embed-image-bomb", ["embed", "--image", "{w}/bomb.png"], "pixels"),
        ("embed-image-truncated", ["embed", "--image", "{w}/truncated.png"], "cannot be read"),
        ("embed-image-missing", ["embed", "--image", "{w}/none.png"], "does not exist"),
        ("embed-text-empty", ["embed", "--text", ""], "empty"),
        ("embed-text-long", ["embed", "--text", LONG], ("tokens long", "--truncate")),
        ("embed-out-exists", ["embed", "--text", "a", "--out", "{w}/user/existing.npz"],
         "already exists"),
        ("embed-out-exists-no-suffix", ["embed", "--text", "a", "--out", "{w}/user/existing"],
         "already exists"),
        ("embed-out-folder", ["embed", "--text", "a", "--out", "{w}/folder.png"],
         "is a folder"),
        ("embed-out-under-file", ["embed", "--text", "a", "--out", "{w}/afile/e.npz"],
         "is a file"),
        ("embed-clip-missing", ["embed", "--text", "a", "--clip", "{w}/nothing"],
         "not a folder"),
        # tokenize
        ("tok-context-0", ["tokenize", "a", "--context-length", "0"], "--context-length"),
        ("tok-context-negative", ["tokenize", "a", "--context-length", "-4"], "--context-length"),
        ("tok-context-huge", ["tokenize", "a", "--context-length", "1000000000"],
         "--context-length"),
        ("tok-empty", ["tokenize", ""], "empty"),
        ("tok-long", ["tokenize", LONG], ("tokens long", "--truncate")),
        ("tok-not-utf8", ["tokenize", "\udce9t\udce9"], "not valid text"),
        # eval
        ("eval-num-captions-0", e[:1] + ["--num-captions", "0"], "--num-captions"),
        ("eval-num-images-0", e + ["--num-images", "0"], "--num-images"),
        ("eval-guidance-nan", e + ["--decoder-guidance", "nan"], "finite"),
        ("eval-prior-guidance-inf", e + ["--prior-guidance", "inf"], "finite"),
        ("eval-upsample-negative", e + ["--upsample", "-1"], "--upsample"),
        ("eval-upsample-too-many", e + ["--upsample", "9"], "upsampling stage"),
        ("eval-table-upsample-too-many", e + ["--table-upsample", "9"], "upsampling stage"),
        ("eval-seed-negative", e + ["--seed", "-1"], "--seed"),
        ("eval-data-seed-2**64", e + ["--data-seed", BIG], "--data-seed"),
        ("eval-table-guidance-nan", e + ["--table-guidance", "1,nan"], "finite"),
        ("eval-table-steps-0", e + ["--table-steps", "0,5"], "--table-steps"),
        ("eval-table-steps-huge", e + ["--table-steps", "50000"], "steps"),
        ("eval-prior-steps-0", e + ["--prior-steps", "0"], "--prior-steps"),
        ("eval-batch-size-0", e + ["--batch-size", "0"], "--batch-size"),
        ("eval-inception-missing", e + ["--inception", "{w}/none.pth"], "--inception"),
        ("eval-inception-garbage", e + ["--inception", "{w}/afile"], "afile"),
        ("eval-out-exists", e + ["--out", "{w}/user/report.md"], "already exists"),
        ("eval-too-many", e[:1] + ["--num-captions", "1000000", "--num-images", "1001"],
         "at most"),
        ("eval-memory", e[:1] + ["--num-captions", "1000000", "--num-images", "100"], "memory"),
        ("eval-out-empty", e + ["--out", ""], "empty"),
        ("embed-out-empty", ["embed", "--text", "a", "--out", ""], "empty"),
        ("eval-out-folder", e + ["--out", "{w}/user"], "is a folder"),
        ("eval-table-samplers-unknown", e + ["--table-samplers", "euler"], "unknown sampler"),
        # shapes, demo, config
        ("shapes-num-train-negative", ["shapes", "--data-dir", "{w}/tfds", "--num-train", "-1"],
         "--num-train"),
        ("shapes-num-test-huge", ["shapes", "--data-dir", "{w}/tfds", "--num-test",
                                  "1000000000000"], "--num-test"),
        ("shapes-seed-negative", ["shapes", "--data-dir", "{w}/tfds", "--seed", "-1"], "--seed"),
        ("shapes-seed-2**64", ["shapes", "--data-dir", "{w}/tfds", "--seed", BIG], "--seed"),
        ("shapes-data-dir-file", ["shapes", "--data-dir", "{w}/afile"], "is a file"),
        ("shapes-nothing", ["shapes", "--data-dir", "{w}/tfds", "--num-train", "0",
                            "--num-test", "0"], "nothing to build"),
        ("demo-out-is-file", ["demo", "--out", "{w}/afile"], "is a file"),
        ("demo-out-has-png", ["demo", "--out", "{w}/user"], "already has"),
        ("demo-config-missing", ["demo", "--config", "{w}/none.py", "--out", "{w}/new_out"],
         "none.py"),
        ("demo-seed-negative", ["demo", "--out", "{w}/new_out", "--config.seed=-1"], "seed"),
        ("config-missing", ["config", "--config", "{w}/none.py"], "none.py"),
    ]


CASES = _cases()


@pytest.mark.parametrize("argv,says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_before_any_work(capsys, work, argv, says):
    argv = [a.replace("{w}", str(work)) for a in argv]
    assert_refused(capsys, argv, says=says, keep=[work])
    assert not os.path.exists(work / "new_out"), "an output folder was made for a refused call"
    assert not os.path.exists(work / "tfds")


def test_there_are_many_cases():
    assert len(CASES) >= 60


# ----------------------------------------------------------------------------------------------
# The image reader
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_png_reads_as_its_8_bit_version(tmp_path, channels):
    from unclip_jax.applications import load_image
    rng = np.random.default_rng(channels)
    a8 = rng.integers(0, 256, (9, 11, channels), dtype=np.uint8)
    (tmp_path / "a8.png").write_bytes(png_bytes(a8))
    (tmp_path / "a16.png").write_bytes(png_bytes(a8.astype(np.uint16) * 257, bits=16))
    eight, sixteen = load_image(tmp_path / "a8.png"), load_image(tmp_path / "a16.png")
    assert sixteen.dtype == np.uint8 and sixteen.shape == (9, 11, 3)
    if channels in (2, 4):   # alpha: composited onto white by the same formula in both
        assert np.abs(sixteen.astype(int) - eight).max() <= 1
    else:
        np.testing.assert_array_equal(sixteen, eight)


def test_16_bit_png_scaled_by_the_training_rule(tmp_path):
    """round(value / 257), as unclip_jax.data.images.decode_rgb; not the high byte."""
    from unclip_jax.applications import load_image
    values = np.array([[[0, 128, 383], [384, 65535, 32896]]], np.uint16)   # [1, 2, 3]
    (tmp_path / "v.png").write_bytes(png_bytes(values, bits=16))
    got = load_image(tmp_path / "v.png")
    np.testing.assert_array_equal(got, np.round(values / 257.0).astype(np.uint8))
    grey = np.array([[[65535], [257], [1000]]], np.uint16)
    (tmp_path / "g.png").write_bytes(png_bytes(grey, bits=16))
    assert load_image(tmp_path / "g.png")[0, :, 0].tolist() == [255, 1, 4]


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "1", "L", "RGBA", "I;16"])
def test_other_modes_convert(tmp_path, mode):
    from unclip_jax.applications import load_image
    rgb = Image.fromarray(np.full((5, 6, 3), 200, np.uint8))
    im = rgb.convert(mode) if mode != "PA" else rgb.convert("P").convert("PA")
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = tmp_path / f"x.{fmt.lower()}"
    im.save(path, format=fmt)
    out = load_image(path)
    assert out.shape == (5, 6, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("name", ["text.png", "empty.png", "truncated.png", "bomb.png"])
def test_load_image_refuses_in_the_api(work, name):
    from unclip_jax.applications import ApplicationError, load_image
    with pytest.raises(ApplicationError, match=repr(str(work / name))[1:-1]):
        load_image(work / name)


# ----------------------------------------------------------------------------------------------
# The Python API refuses the same values (UserError subclasses), before any work
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from unclip_jax.pipeline import UnCLIPPipeline
    folder = tiny_pipeline(tmp_path_factory.mktemp("tiny") / "p")
    return UnCLIPPipeline.from_pretrained(folder)


API_CASES = [
    ("guidance-nan", dict(decoder_settings={"guidance_scale": float("nan")}), "finite"),
    ("guidance-inf", dict(prior_settings={"guidance_scale": float("inf")}), "finite"),
    ("eta-nan", dict(decoder_settings={"eta": float("nan")}), "finite"),
    ("steps-float", dict(decoder_settings={"steps": 2.5}), "integer"),
    ("steps-string", dict(decoder_settings={"steps": "many"}), "integer"),
    ("steps-0", dict(decoder_settings={"steps": 0}), "steps"),
    ("best-of-0", dict(prior_settings={"best_of": 0}), "best_of"),
    ("upsample-negative", dict(upsample=-1), "upsample"),
    ("upsample-too-many", dict(upsample=1), "upsample"),
    ("num-images-0", dict(num_images=0), "num_images"),
    ("num-images-float", dict(num_images=1.5), "num_images"),
    ("num-images-huge", dict(num_images=10 ** 12), "memory"),
    ("seed-negative", dict(seed=-1), "seed"),
    ("seed-2**64", dict(seed=2 ** 64), "seed"),
    ("seed-float", dict(seed=0.5), "seed"),
    ("batch-size-0", dict(batch_size=0), "batch_size"),
    ("prior-unknown", dict(prior="gan"), "prior"),
    ("settings-not-dict", dict(decoder_settings=[("steps", 2)]), "dict"),
    ("unknown-setting", dict(decoder_settings={"stepz": 2}), "stepz"),
]


@pytest.mark.parametrize("kwargs,says", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_generate_api_refuses(pipe, kwargs, says):
    from unclip_jax.errors import UserError
    before = dict(pipe.trace_counts)
    with pytest.raises(UserError, match=says):
        pipe.generate(["a red circle"], **kwargs)
    assert pipe.trace_counts == before, "work was done before the refusal"


@pytest.mark.parametrize("prompt,says", [("", "empty"), (LONG, "truncate=True"), (["a", 3], "int"),
                                         ("\x00\x01", "empty once cleaned"), ([], "No prompt")])
def test_generate_api_refuses_prompts(pipe, prompt, says):
    from unclip_jax.errors import UserError
    with pytest.raises(UserError, match=says):
        pipe.generate(prompt)
    with pytest.raises(UserError, match=says):
        pipe(prompt)


def test_api_truncate_and_seeds_beyond_32_bits(pipe):
    import jax

    from unclip_jax.pipeline.settings import seed_key
    text = pipe.encode_text(LONG, truncate=True)
    assert text.mask[0].all()                                    # cut to the context
    data = lambda s: jax.random.key_data(seed_key(s)).tolist()  # noqa: E731
    assert data(5) == jax.random.key_data(jax.random.key(5)).tolist()   # as before below 2**32
    assert len({str(data(s)) for s in (0, 2 ** 32, 2 ** 63, 2 ** 64 - 1, 1)}) == 5


# ----------------------------------------------------------------------------------------------
# --overwrite replaces only the files a command writes
# ----------------------------------------------------------------------------------------------

def test_overwrite_replaces_only_our_files(capsys, tmp_path, pipe):
    folder = tiny_pipeline(tmp_path / "p")
    out = tmp_path / "out"
    out.mkdir()
    (out / "0_0.png").write_bytes(b"old image")
    (out / "notes.txt").write_text("mine")
    argv = ["generate", "--checkpoint", folder, "--prompt", "a red circle", "--prior-steps", "2",
            "--decoder-steps", "2", "--out", out]
    assert_refused(capsys, argv, says="already has", keep=[out])
    before = snapshot(out)
    rc, _, err = run_cli(capsys, argv + ["--overwrite"])
    assert rc == 0, err
    after = snapshot(out)
    assert after[str(out / "notes.txt")] == before[str(out / "notes.txt")]
    assert after[str(out / "0_0.png")] != before[str(out / "0_0.png")]
    assert sorted(os.listdir(out)) == ["0_0.png", "grid.png", "notes.txt"]   # no temp files
    Image.open(out / "0_0.png").verify()
    # --grid into a folder that does not exist yet: made
    rc, _, err = run_cli(capsys, argv + ["--overwrite", "--grid", tmp_path / "new" / "g.png"])
    assert rc == 0 and (tmp_path / "new" / "g.png").is_file(), err
