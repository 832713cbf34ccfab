"""The Shapes recipe (configs/shapes.py: every stage resolves and the parts fit together), and
`unclip-jax export`: a trained workdir becomes a pipeline component equal to its checkpoint."""
import os

import numpy as np
import pytest

from unclip_jax.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "shapes.py")
STAGES = {"clip": "clip", "diffusion_prior": "diffusion_prior", "ar_prior": "ar_prior",
          "decoder": "decoder", "sr64": "upsampler", "sr128": "upsampler"}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_config_stage_resolves(stage):
    from unclip_jax.train.stages import get_stage
    config = load_config(f"{CONFIG}:stage={stage},runlocal")
    assert config.stage == STAGES[stage]
    get_stage(config.stage)
    # every stage shares CLIP's widths, so the bundle's parts fit together
    if stage in ("diffusion_prior", "ar_prior", "decoder"):
        dims = {k: config.model[k] for k in ("embed_dim", "clip_dim") if k in config.model}
        assert set(dims.values()) == {load_config(f"{CONFIG}:stage=clip").model.embed_dim}


def test_unknown_stage_is_refused():
    with pytest.raises(ValueError, match="Unknown Shapes stage"):
        load_config(f"{CONFIG}:stage=vae")


def test_export_a_trained_workdir_into_a_pipeline_folder(tmp_path):
    from unclip_jax import cli, export
    from unclip_jax.train import checkpoint as ckpt
    from unclip_jax.train.trainer import train
    workdir, out = str(tmp_path / "run"), str(tmp_path / "pipe")
    cfg = load_config(os.path.join(REPO, "configs", "diffusion_prior.py:runlocal"),
                      ["model.num_layers=1", "total_steps=2", "eval_every=0",
                       "checkpoint.every_steps=2", "mesh.min_shard_bytes=0"])
    train(cfg, workdir, progress=False)
    assert cli.main(["export", "--workdir", workdir, "--out", out, "--name", "prior"]) == 0
    prior = export.load_component(out, "prior")
    state, _ = ckpt.load_arrays(workdir)
    saved = sorted(np.asarray(x).ravel()[:3].tolist() for x in _leaves(state["params"]))
    loaded = sorted(np.asarray(x).ravel()[:3].tolist() for x in _leaves(_params(prior)))
    assert len(saved) == len(loaded) and saved == loaded
    assert export.read_manifest(out)["components"]["prior"]["class"] == "DiffusionPrior"
    # a stage that is not CLIP cannot be written as a Hugging Face CLIP folder
    assert cli.main(["export", "--workdir", workdir, "--hf-out", str(tmp_path / "hf")]) == 2


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def _params(module):
    from flax import nnx
    return nnx.state(module, nnx.Param)
