"""A trainer workdir -> a component of an unclip-jax pipeline folder (see unclip_jax.io).

    module, config, step = load_trained(workdir, ema=True)       # the stage's NNX model
    export_workdir(workdir, out, name="decoder", ema=True, dtype="bfloat16")

The trainer's workdir holds the config the run used (checkpoint metadata), so the model is
rebuilt from it with ``unclip_jax.train.trainer.build_setup`` and the checkpoint restored into
that abstract state (parameters, or their EMA with ``ema=True``, plus the non-trained buffers:
the diffusion prior's z_i mean / std, the AR prior's PCA quantiser).

A CLIP run exports as the whole model (name 'clip') or as its text tower alone (name
'text_encoder', class CLIPText: what a pipeline needs to encode captions), and optionally as a
Hugging Face ``CLIPModel`` folder (``hf_out``), which ``unclip-jax precompute --clip`` reads.

:data:`unclip_jax.pipeline.settings.SHAPES_SAMPLING` holds the sampling defaults the bundled
Shapes pipeline ships with (``sampling='shapes'``).
"""
from __future__ import annotations

import copy
from typing import Any

import jax
import ml_collections
from flax import nnx

from unclip_jax.clip.text_encoder import CLIPTextEncoder
from unclip_jax.clip.tokenizer import get_tokenizer
from unclip_jax.convert import hf_clip
from unclip_jax.errors import UserError
from unclip_jax.io import paths, pipeline_folder
from unclip_jax.models.layers import abstract_init
from unclip_jax.pipeline.settings import SAMPLING_PRESETS
from unclip_jax.train import checkpoint as ckpt
from unclip_jax.train.trainer import build_setup


class TrainedExportError(UserError, ValueError):
    """A workdir or export request that cannot be turned into a pipeline component."""


_CLASS_OF_STAGE = {"clip": "CLIP", "diffusion_prior": "DiffusionPrior", "ar_prior": "ARPrior",
                   "decoder": "Decoder", "upsampler": "SuperRes"}


def _config_from_meta(meta: dict, workdir: str):
    cfg = meta.get("config")
    if not isinstance(cfg, dict) or "stage" not in cfg:
        raise TrainedExportError(f"The checkpoint in {workdir} carries no training config; it was "
                                 "not written by `unclip-jax train`.")
    return ml_collections.ConfigDict(cfg)


def load_trained(workdir: str, *, ema: bool = False, step: int | None = None):
    """(module, config, step) of the latest (or ``step``) checkpoint of a trainer workdir.

    ``ema=True`` takes the EMA of the parameters (an error if the run kept none)."""
    workdir = paths.check(workdir)
    if not paths.isdir(workdir):
        raise TrainedExportError(f"--workdir {workdir!r} does not exist; pass the folder given to "
                                 "`unclip-jax train --workdir`.")
    manager = ckpt.make_manager(workdir)
    try:
        step = ckpt.latest_step(manager) if step is None else step
        if step is None:
            raise TrainedExportError(f"{workdir} holds no checkpoint yet; train first (or wait "
                                     "for the first checkpoint.every_steps).")
        meta = ckpt.read_meta(manager, step)
        config = _config_from_meta(meta, workdir)
        setup = build_setup(config)
        abstract = setup["abstract"]
        if ema and "ema" not in abstract:
            raise TrainedExportError(f"{workdir} was trained without EMA (ema_decay 0); export "
                                     "without --ema.")
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                              abstract)
        state, _ = ckpt.restore(manager, step, target)
    finally:
        manager.close()
    params = state["ema"] if ema else state["params"]
    module = nnx.merge(setup["graphdef"], params, state["rest"])
    return module, config, int(step)


def text_encoder_of(clip_model):
    """The text tower + text projection of a CLIP (class CLIPText), sharing its variables."""
    te = abstract_init(lambda: CLIPTextEncoder(clip_model.config, nnx.Rngs(0)))
    te.text = clip_model.text
    te.text_projection = clip_model.text_projection
    return te


def _manifest_sampling(out: str) -> dict:
    """The sampling section already in ``out``'s manifest ({} if none)."""
    if paths.isfile(pipeline_folder.manifest_path(out)):
        return copy.deepcopy(pipeline_folder.read_manifest(out).get("sampling", {}))
    return {}


def export_workdir(workdir: str, out: str | None, name: str, *, ema: bool = False,
                   dtype: str | None = None, hf_out: str | None = None,
                   sampling: str | None = None, context_length: int | None = None) -> dict:
    """Write the model of ``workdir`` as component ``name`` of the pipeline folder ``out`` (and,
    for CLIP, optionally as a Hugging Face folder ``hf_out``). Returns a summary dict."""
    module, config, step = load_trained(workdir, ema=ema)
    summary: dict[str, Any] = {"workdir": workdir, "step": step, "stage": config.stage,
                               "ema": ema}
    if config.stage == "clip":
        if hf_out:
            paths.makedirs(hf_out)
            hf_clip.save_pretrained(module, hf_out)
            summary["hf_out"] = hf_out
        if name == "text_encoder":
            module = text_encoder_of(module)
        elif name != "clip" and out:
            raise TrainedExportError(f"A CLIP run exports as 'clip' (both towers) or "
                                     f"'text_encoder' (text tower only), not {name!r}.")
    elif hf_out:
        raise TrainedExportError(f"--hf-out writes a CLIP; {workdir} trained stage "
                                 f"{config.stage!r}.")
    if out:
        entry = pipeline_folder.save_component(out, name, module, dtype=dtype)
        path = paths.join(out, entry["weights"])
        summary.update(out=out, name=name, cls=entry["class"], bytes=paths.getsize(path))
        extra = {}
        existing = _manifest_sampling(out)   # the folder's sampling section, read once
        if sampling is not None:
            if sampling not in SAMPLING_PRESETS:
                raise TrainedExportError(f"Unknown sampling preset {sampling!r}; known: "
                                         f"{', '.join(SAMPLING_PRESETS)}.")
            extra["sampling"] = copy.deepcopy(SAMPLING_PRESETS[sampling])
            # a preset never overrides what an exported decoder recorded it predicts
            kept = existing.get("decoder", {}).get("prediction_type")
            if kept:
                extra["sampling"]["decoder"]["prediction_type"] = kept
        if config.stage == "decoder":
            # the sampler must read the model's output as what it was trained to predict
            if "sampling" not in extra:
                extra["sampling"] = existing
            extra["sampling"].setdefault("decoder", {})["prediction_type"] = str(
                config.diffusion.get("prediction_type", "epsilon"))
        if config.stage == "clip":
            ctx = int(context_length or module.config.context_length)
            extra["tokenizer"] = {"kind": "clip_bpe", "vocab": "bpe_simple_vocab_16e6",
                                  "context_length": ctx,
                                  "pad_id": int(get_tokenizer(ctx).pad_id)}
        if extra:
            pipeline_folder.save_manifest(out, **extra)
    return summary
