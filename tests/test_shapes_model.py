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
    from unclip_jax.train.registry import get_stage
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
    from unclip_jax import cli
    from unclip_jax.io import pipeline_folder
    from unclip_jax.train import checkpoint as ckpt
    from unclip_jax.train.trainer import train
    workdir, out = str(tmp_path / "run"), str(tmp_path / "pipe")
    cfg = load_config(os.path.join(REPO, "configs", "diffusion_prior.py:runlocal"),
                      ["model.num_layers=1", "total_steps=2", "eval_every=0",
                       "checkpoint.every_steps=2", "mesh.min_shard_bytes=0"])
    train(cfg, workdir, progress=False)
    assert cli.main(["export", "--workdir", workdir, "--out", out, "--name", "prior"]) == 0
    prior = pipeline_folder.load_component(out, "prior")
    state, _ = ckpt.load_arrays(workdir)
    saved = sorted(np.asarray(x).ravel()[:3].tolist() for x in _leaves(state["params"]))
    loaded = sorted(np.asarray(x).ravel()[:3].tolist() for x in _leaves(_params(prior)))
    assert len(saved) == len(loaded) and saved == loaded
    assert pipeline_folder.read_manifest(out)["components"]["prior"]["class"] == "DiffusionPrior"
    # a stage that is not CLIP cannot be written as a Hugging Face CLIP folder
    assert cli.main(["export", "--workdir", workdir, "--hf-out", str(tmp_path / "hf")]) == 2


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def _params(module):
    from flax import nnx
    return nnx.state(module, nnx.Param)


def test_decoder_export_records_its_prediction_type(tmp_path, monkeypatch):
    """The sampler must read a decoder's output as what it trained to predict: export writes the
    training config's prediction_type into the manifest (with or without a sampling preset), and
    a wrong one is refused."""
    import ml_collections
    from flax import nnx

    from pipeline_fixtures import materialise
    from unclip_jax.io import pipeline_folder
    from unclip_jax.models.decoder import Decoder, DecoderConfig
    from unclip_jax.pipeline import PipelineError
    from unclip_jax.train import to_pipeline
    dec = materialise(lambda: Decoder(DecoderConfig(
        image_size=8, channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(),
        head_dim=8, groups=4, clip_dim=64, context_dim=16, text_width=64), nnx.Rngs(0)), 0)
    cfg = ml_collections.ConfigDict({"stage": "decoder", "diffusion": {
        "prediction_type": "v_prediction"}})
    monkeypatch.setattr(to_pipeline, "load_trained", lambda *a, **k: (dec, cfg, 7))
    for preset, out in (("shapes", tmp_path / "a"), (None, tmp_path / "b")):
        to_pipeline.export_workdir("run", str(out), "decoder", sampling=preset)
        sampling = pipeline_folder.read_manifest(out)["sampling"]
        assert sampling["decoder"]["prediction_type"] == "v_prediction"
        assert sampling["decoder"]["uncond_text"] == "dropped"   # the trainer's caption dropout
        assert ("super_res" in sampling) == (preset == "shapes")
    # a later export with the preset (another stage) keeps what the decoder recorded
    cfg.stage = "upsampler"
    to_pipeline.export_workdir("run", str(tmp_path / "a"), "sr64", sampling="shapes")
    sampling = pipeline_folder.read_manifest(tmp_path / "a")["sampling"]
    assert sampling["decoder"]["prediction_type"] == "v_prediction"
    from unclip_jax.pipeline import DEFAULT_SETTINGS, merge_settings
    with pytest.raises(PipelineError, match="prediction_type must be"):
        merge_settings(DEFAULT_SETTINGS, {"decoder": {"prediction_type": "x0"}})
    with pytest.raises(PipelineError, match="uncond_text must be one of"):
        merge_settings(DEFAULT_SETTINGS, {"decoder": {"uncond_text": "none"}})
