"""Every `unclip-jax` command that README.md (its ```bash blocks) and the configs' docstrings show
runs, so the documentation cannot drift from the code.

Each documented command is parsed by the real parser, then run in one temporary folder, in the
order of its document (a chain's later commands read what the earlier ones wrote), offline:
  - as written, when it is cheap;
  - with the cheap flags of ``CHEAP`` appended (the tiny test pipeline, fewer steps: the
    documented flags themselves, so the command line is the documented one plus overrides);
  - or as the variant ``VARIANTS`` names for it: a training run traced (one real input batch,
    the loss traced abstractly: the data exists and fits the model), a 2-step training run, the
    same command on a workdir the chain did train, or a test elsewhere that runs it.
A documented command that is neither cheap nor in the table is run as written: if it cannot
run, this test fails and says which document shows it.
"""
import ast
import glob
import os
import re
import shlex

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pipeline_fixtures import tiny_pipeline
from unclip_jax import cli
from unclip_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "tiny_pipeline"       # the test pipeline (pipeline_fixtures.tiny_pipeline) in the folder
IMAGES = ("in.png", "a.png", "b.png")

# Flags appended to every documented command of these kinds (argparse: the last value wins).
SAMPLING = f"--checkpoint {TINY} --decoder-steps 2 --overwrite"  # commands share out/
APPS = f"{SAMPLING} --refine-iters 0"
CHEAP = {
    "generate": f"{SAMPLING} --prior-steps 2",
    "vary": APPS, "interpolate": APPS, "textdiff": APPS + " --thetas 0,0.5",
    "probe": f"{SAMPLING} --reconstructions 1",
    "eval": f"{SAMPLING} --prior-steps 2 --num-captions 2 --num-images 1 --table-captions 1 "
            "--table-priors diffusion --table-guidance 2 --table-samplers ddim --table-steps 2 "
            "--table-best-of 1",
    "precompute": "--num 16",
    "clip-retrieval": "--num-examples 20",
    "demo": "--overwrite",
}

TRACE = "trace"      # a training command checked by tracing its loss on one batch of its input
TWO_STEPS = " --config.total_steps=2 --config.checkpoint.every_steps=2 --no-progress"
ELSEWHERE = "tests/"  # a variant that starts so names the test that runs the command

# Documented command (as extracted: continuations joined, comments dropped) -> the variant that
# runs instead: a command line, TRACE + a config spec, or a test that runs it.
VARIANTS = {
    # README.md: the Karlo conversion needs a diffusers folder (torch builds a tiny one there)
    "unclip-jax convert --from diffusers path/to/karlo-v1-alpha --out karlo_jax":
        "tests/test_convert_cli.py::test_convert_then_generate_cli",
    'unclip-jax generate --checkpoint karlo_jax --prompt "a red frog on a green leaf"':
        "tests/test_convert_cli.py::test_convert_then_generate_cli",
    # README.md: the upsamplers alone need a pipeline with upsamplers (the bundled model)
    "unclip-jax eval --upsamplers":
        "tests/test_shapes_eval.py::test_eval_upsamplers_command_on_the_bundled_model",
    # README.md and configs/shapes.py: the Shapes chain, on the tiny dataset, 2 steps per stage
    "unclip-jax shapes --data-dir data/tfds":
        "unclip-jax shapes --data-dir data/tfds --config tiny",
    "unclip-jax train --config configs/shapes.py:stage=clip --workdir runs/clip":
        "unclip-jax train --config configs/shapes.py:stage=clip,runlocal --workdir runs/clip"
        + TWO_STEPS,
    "unclip-jax precompute --clip runs/clip_hf --input tfds:shapes:train --data-dir data/tfds "
    "--out data/emb --hidden --image-size 32":
        "unclip-jax precompute --clip runs/clip_hf --input tfds:shapes/tiny:train "
        "--data-dir data/tfds --out data/emb --hidden --image-size 32",
    "unclip-jax precompute --clip runs/clip_hf --input tfds:shapes:train --data-dir data/tfds "
    "--out data/emb --hidden --hidden-dtype float16 --image-size 32 --batch-size 256":
        "unclip-jax precompute --clip runs/clip_hf --input tfds:shapes/tiny:train "
        "--data-dir data/tfds --out data/emb_f16 --hidden --hidden-dtype float16 "
        "--image-size 32 --batch-size 256",
    "unclip-jax train --config configs/shapes.py:stage=decoder --workdir runs/decoder":
        "unclip-jax train --config configs/shapes.py:stage=decoder,runlocal --workdir runs/decoder"
        + TWO_STEPS,
    "unclip-jax train --config configs/shapes.py:stage=diffusion_prior --workdir runs/prior":
        TRACE + " configs/shapes.py:stage=diffusion_prior,runlocal",
    "unclip-jax train --config configs/shapes.py:stage=ar_prior --workdir runs/ar_prior":
        TRACE + " configs/shapes.py:stage=ar_prior,runlocal",
    "unclip-jax train --config configs/shapes.py:stage=sr64 --workdir runs/sr64":
        TRACE + " configs/shapes.py:stage=sr64,runlocal",
    "unclip-jax train --config configs/shapes.py:stage=sr128 --workdir runs/sr128":
        TRACE + " configs/shapes.py:stage=sr128,runlocal",
    **{f"unclip-jax export --workdir runs/{s} --out shapes_model --name {s} --ema --dtype bfloat16 "
       "--sampling shapes": "unclip-jax export --workdir runs/decoder --out shapes_model "
       "--name decoder --ema --dtype bfloat16 --sampling shapes"
       for s in ("prior", "ar_prior", "sr64", "sr128")},
    # configs/shapes.py repeats README's Hugging Face export, which wrote runs/clip_hf in this
    # same folder already: replacing it takes --overwrite
    "unclip-jax export --workdir runs/clip --hf-out runs/clip_hf":
        "unclip-jax export --workdir runs/clip --hf-out runs/clip_hf --overwrite",
    # configs/clip.py
    "unclip-jax train --config configs/clip.py:size=small --workdir runs/clip_small "
    "--config.input.paths='[\"shards/*.tar\"]'": TRACE + " configs/clip.py:runlocal",
    "unclip-jax export --workdir runs/clip_small --hf-out runs/clip_small_hf":
        "unclip-jax export --workdir runs/clip --hf-out runs/clip_small_hf",
    "unclip-jax train --config configs/clip.py:runlocal --workdir runs/clip_tiny":
        TRACE + " configs/clip.py:runlocal",
    # configs/decoder.py
    "unclip-jax train --config configs/decoder.py:size=karlo --workdir runs/decoder "
    "--config.input.paths=data/emb": TRACE + " configs/decoder.py:runlocal",
    "unclip-jax train --config configs/decoder.py:runlocal --workdir runs/decoder_tiny":
        TRACE + " configs/decoder.py:runlocal",
    # configs/upsampler.py
    "unclip-jax train --config configs/upsampler.py:size=paper_1024 --workdir runs/sr1024 "
    "--config.input.paths='[\"shards/*.tar\"]'": TRACE + " configs/upsampler.py:runlocal",
    "unclip-jax train --config configs/upsampler.py:runlocal --workdir runs/sr_tiny":
        TRACE + " configs/upsampler.py:runlocal",
    # configs/diffusion_prior.py and configs/ar_prior.py (synthetic task at runlocal)
    "unclip-jax train --config configs/diffusion_prior.py:size=paper --workdir runs/prior "
    "--config.input.paths=data/emb": TRACE + " configs/diffusion_prior.py:runlocal",
    "unclip-jax train --config configs/diffusion_prior.py:runlocal --workdir runs/prior_tiny":
        TRACE + " configs/diffusion_prior.py:runlocal",
    "unclip-jax train --config configs/ar_prior.py:size=paper --workdir runs/ar_prior "
    "--config.input.paths=data/emb": TRACE + " configs/ar_prior.py:runlocal",
    "unclip-jax train --config configs/ar_prior.py:runlocal --workdir runs/ar_prior_tiny":
        TRACE + " configs/ar_prior.py:runlocal",
    # configs/demo.py (45 s): tests/test_cli.py runs its runlocal variant, smaller still
    "unclip-jax demo --config configs/demo.py --out out":
        "tests/test_cli.py::test_demo_runs_small",
    "unclip-jax demo --config configs/demo.py:runlocal":
        "tests/test_cli.py::test_demo_runs_small",
}


def _join_continuations(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def _commands_in(text: str) -> list[str]:
    found = []
    for line in _join_continuations(text):
        line = line.strip()
        if line.startswith("unclip-jax "):
            found.append(shlex.join(shlex.split(line, comments=True)))
    return found


def documented_commands() -> list[tuple[str, str]]:
    """(document, command) of every `unclip-jax` line of README.md's bash blocks and of each
    config's docstring, in document order, normalised by shlex (comments dropped)."""
    out = []
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        out += [("README.md", c) for c in _commands_in(block)]
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read())) or ""
        out += [(f"configs/{os.path.basename(path)}", c) for c in _commands_in(doc)]
    return out


def _norm(command: str) -> str:
    return shlex.join(shlex.split(command))


def plan() -> list[tuple[str, str, str]]:
    """(document, documented command, what runs) for every documented command."""
    table = {_norm(k): v for k, v in VARIANTS.items()}
    rows = []
    for doc, command in documented_commands():
        if command in table:
            run = table[command]
        else:
            name = shlex.split(command)[1]
            run = command + (" " + CHEAP[name] if name in CHEAP else "")
        rows.append((doc, command, run))
    return rows


def test_documented_commands_are_found_and_the_table_has_no_stale_rows():
    commands = {c for _, c in documented_commands()}
    names = {shlex.split(c)[1] for c in commands}
    assert {"generate", "vary", "interpolate", "textdiff", "probe", "train", "export",
            "precompute", "shapes", "eval", "config", "embed", "clip-retrieval"} <= names
    stale = sorted(set(map(_norm, VARIANTS)) - commands)
    assert not stale, f"VARIANTS rows that no document shows any more: {stale}"
    for variant in VARIANTS.values():
        if variant.startswith(ELSEWHERE):
            file, _, test = variant.partition("::")
            with open(os.path.join(REPO, file), encoding="utf-8") as f:
                assert f"def {test}(" in f.read(), variant


@pytest.mark.parametrize("doc, command", documented_commands(), ids=lambda v: v[:60])
def test_every_documented_command_parses(doc, command):
    overrides, rest = config_lib.split_overrides(shlex.split(command)[1:])
    args = cli.build_parser().parse_args(rest)
    assert callable(args.func)
    if overrides:
        assert "config" in vars(args), f"{doc}: {command}: --config.* needs --config"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("documented")
    os.symlink(os.path.join(REPO, "configs"), d / "configs")
    for i, name in enumerate(IMAGES):
        image = np.zeros((48, 48, 3), np.uint8) + 240
        image[8 + 4 * i:30 + 4 * i, 10:34] = (200, 40, 40) if i % 2 == 0 else (40, 60, 200)
        Image.fromarray(image).save(d / name)
    tiny_pipeline(d / TINY)
    return d


def trace_train(spec: str) -> None:
    """The training config ``spec``'s stage: one global batch of its input, and its loss traced
    (jax.eval_shape: no compilation) on that batch with the model the config builds."""
    from unclip_jax.train import inputs
    from unclip_jax.train.registry import get_stage
    config = config_lib.load_config(spec)
    stage = get_stage(config.stage)
    it = inputs.make_input(config.input, global_batch_size=int(config.batch_size), seed=0,
                           process_index=0, process_count=1)
    batch = inputs.select(next(it), stage.batch_keys(config))
    loss_fn = stage.make_loss_fn(config)

    def loss(batch):
        return loss_fn(stage.build_model(config, nnx.Rngs(0)), batch, jax.random.key(0))[0]

    assert jax.eval_shape(loss, batch).shape == ()


def test_every_documented_command_runs(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    done, failures = {}, []
    for doc, command, run in plan():
        if run.startswith(ELSEWHERE) or run in done:
            continue
        try:
            if run.startswith(TRACE):
                trace_train(run.split(" ", 1)[1])
                rc = 0
            else:
                rc = cli.main(shlex.split(run)[1:])
        except Exception as e:  # noqa: BLE001  (reported with the command, below)
            rc = f"{type(e).__name__}: {e}"
        out, err = capsys.readouterr()
        done[run] = rc
        if rc != 0:
            failures.append(f"{doc}: {command}\n  ran: {run}\n  -> {rc}\n  {err[-800:]}")
    assert not failures, "documented commands that fail:\n" + "\n".join(failures)
    # what the chain wrote: the pipeline folder with CLIP and the EMA decoder, PNGs with settings
    from unclip_jax.io import pipeline_folder
    comps = pipeline_folder.read_manifest(str(folder / "my_pipeline"))["components"]
    assert {"clip", "decoder"} <= set(comps)
    with Image.open(folder / "out" / "generate" / "0_0.png") as im:   # the README's last generate
        assert im.text["prompt"] == "a red circle" and im.text["command"] == "generate"
        assert '"decoder_steps": 2' in im.text["settings"] and im.text["seed"] == "0"
        assert os.path.realpath(im.text["model"]) == os.path.realpath(folder / TINY)
    with Image.open(folder / "out" / "generate" / "grid.png") as im:
        assert im.text["prompt"] == '["a red circle"]'
    with Image.open(folder / "out" / "vary" / "variation_00.png") as im:
        assert im.text["image"] == "in.png" and im.text["command"] == "vary"
