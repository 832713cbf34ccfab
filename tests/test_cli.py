"""The `unclip-jax` command: each subcommand on real inputs, and one-line errors for bad ones."""
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from unclip_jax import cli, clip
from unclip_jax.convert import hf_clip

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_console_script_help():
    exe = os.path.join(os.path.dirname(sys.executable), "unclip-jax")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("demo", "embed", "tokenize", "config"):
        assert command in proc.stdout


def test_tokenize(capsys):
    rc, out, _ = run(capsys, "tokenize", "a red circle")
    assert rc == 0
    assert "[49406, 320, 736, 7117, 49407]" in out


def test_tokenize_refuses_overlong_and_empty(capsys):
    rc, _, err = run(capsys, "tokenize", "word " * 100)
    assert rc == 2 and "100 tokens long" in err and "--truncate" in err  # the CLI flag named
    assert "Traceback" not in err
    rc, _, err = run(capsys, "tokenize", "  ")
    assert rc == 2 and "is empty" in err


def test_config_prints_overrides_and_refuses_bad_keys(capsys):
    spec = os.path.join(REPO, "configs", "clip.py") + ":size=tiny"
    rc, out, _ = run(capsys, "config", "--config", spec, "--config.batch_size=8")
    assert rc == 0 and "batch_size: 8" in out and "preset: tiny" in out
    rc, _, err = run(capsys, "config", "--config", spec, "--config.optimizer.learning_rat=1")
    assert rc == 2 and "Unknown config key 'config.optimizer.learning_rat'" in err
    rc, _, err = run(capsys, "config", "--config", spec, "--config.batch_size=big")
    assert rc == 2 and "'config.batch_size' expects an integer, got 'big'" in err
    rc, _, err = run(capsys, "config", "--config", spec.replace("size", "sise"))
    assert rc == 2 and "Unknown config argument 'sise'" in err


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip")
    model = clip.CLIP(clip.get_preset("tiny"), rngs=nnx.Rngs(0))
    hf_clip.save_pretrained(model, path)
    return str(path), model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    paths = []
    for i, colour in enumerate([(220, 30, 30), (30, 70, 220)]):
        p = str(d / f"im{i}.png")
        Image.new("RGB", (40, 48), colour).save(p)
        paths.append(p)
    bad = str(d / "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG not really")
    return paths, bad


def test_embed_text_and_images(capsys, tiny_clip_dir, images, tmp_path):
    path, model = tiny_clip_dir
    out_file = str(tmp_path / "emb.npz")
    rc, out, err = run(capsys, "embed", "--clip", path, "--text", "a red square",
                       "--text", "a blue square", "--image", images[0][0], "--image", images[0][1],
                       "--out", out_file)
    assert rc == 0, err
    assert "cosine similarity" in out and "im0.png" in out
    saved = np.load(out_file)
    tokens = clip.get_tokenizer()(["a red square", "a blue square"])
    np.testing.assert_allclose(saved["text_embeds"], np.asarray(model.encode_text(tokens.ids)[0]),
                               rtol=1e-5, atol=1e-6)
    pixels = clip.preprocess([Image.open(p) for p in images[0]], image_size=32)
    np.testing.assert_allclose(saved["image_embeds"], np.asarray(model.encode_image(pixels)),
                               rtol=1e-5, atol=1e-6)
    assert saved["texts"].tolist() == ["a red square", "a blue square"]


def test_embed_errors(capsys, tiny_clip_dir, images, tmp_path):
    path, _ = tiny_clip_dir
    rc, _, err = run(capsys, "embed", "--clip", str(tmp_path / "nowhere"), "--text", "a")
    assert rc == 2 and "nowhere" in err and "Traceback" not in err
    rc, _, err = run(capsys, "embed", "--clip", path, "--image", images[1])
    assert rc == 2 and "broken.png' cannot be read as an image" in err
    rc, _, err = run(capsys, "embed", "--clip", path, "--image", str(tmp_path / "gone.png"))
    assert rc == 2 and "gone.png' does not exist" in err
    rc, _, err = run(capsys, "embed", "--clip", path)
    assert rc == 2 and "Nothing to embed" in err


def test_overrides_on_a_command_without_config(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tokenize", "a", "--config.x=1"])
    assert "takes no config" in capsys.readouterr().err


def test_demo_runs_small(capsys, tmp_path):
    rc, out, err = run(capsys, "demo", "--config", os.path.join(REPO, "configs", "demo.py") + ":runlocal",
                       "--out", str(tmp_path), "--config.num_samples=512", "--config.samplers.ddpm=100",
                       "--config.clip.steps=40", "--config.clip.eval_images=36")
    assert rc == 0, err
    for name in ("demo_samplers.png", "demo_clip.png"):
        assert Image.open(tmp_path / name).size[0] > 500
    assert "DPM-Solver++ 20" in out and "zero-shot on 36 fresh images" in out


def test_version(capsys):
    import unclip_jax
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"unclip-jax {unclip_jax.__version__}"


def _subparsers():
    import argparse
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_writes_each_default_once():
    for name, p in _subparsers().items():
        assert p.formatter_class is cli.HelpFormatter, name
        text = " ".join(p.format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, name
        formatter = p.formatter_class(p.prog)
        for action in p._actions:
            help_text = formatter._get_help_string(action) or ""
            assert help_text.lower().count("(default:") <= 1, (name, action.dest, help_text)
    text = " ".join(_subparsers()["generate"].format_help().split())
    assert "Images per prompt. (default: 1)" in text


def test_flags_are_named_alike_across_commands():
    commands = _subparsers()
    for name in ("generate", "vary", "interpolate", "textdiff", "probe", "eval"):
        flags = {opt: a for a in commands[name]._actions for opt in a.option_strings}
        assert {"--decoder-steps", "--decoder-guidance", "--seed", "--out", "--checkpoint",
                "--upsample"} <= set(flags), name
        assert not {"--steps", "--guidance-scale", "--guidance"} & set(flags), name
        if name != "eval":   # eval's --out is an optional markdown report
            assert not flags["--out"].required and flags["--out"].default.startswith("out"), name


def test_embed_defaults_to_the_bundled_clip(capsys, images, tmp_path):
    from unclip_jax.assets import SHAPES
    out_file = str(tmp_path / "emb.npz")
    rc, out, err = run(capsys, "embed", "--text", "a red circle", "--image", images[0][0],
                       "--out", out_file)
    assert rc == 0, err
    assert "text_embeds: (1, 64)" in out and "cosine similarity" in out
    rc, out2, err = run(capsys, "embed", "--clip", SHAPES, "--text", "a red circle")
    assert rc == 0, err
    assert out2.splitlines()[0] == out.splitlines()[0]
