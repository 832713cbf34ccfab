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
from unclip_jax.io import outputs, paths, pipeline_folder
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


def check_workdir(workdir: str) -> str:
    """Refuse a workdir that is not a trainer workdir with checkpoints (before anything is
    created there: the checkpoint manager would make the folder)."""
    workdir = paths.check(workdir)
    if not paths.isdir(workdir):
        what = "is not a folder" if paths.exists(workdir) else "does not exist"
        raise TrainedExportError(f"--workdir {workdir!r} {what}; pass the folder given to "
                                 "`unclip-jax train --workdir`.")
    if not paths.isdir(ckpt.checkpoint_dir(workdir)):
        raise TrainedExportError(f"{workdir} holds no checkpoints/ folder: it is not a trainer "
                                 "workdir, or no checkpoint was saved yet (train first).")
    return workdir


def stage_of(workdir: str) -> str | None:
    """The stage the latest checkpoint of ``workdir`` trained (from its metadata), or None."""
    manager = ckpt.make_manager(check_workdir(workdir))
    try:
        step = ckpt.latest_step(manager)
        meta = ckpt.read_meta(manager, step) if step is not None else {}
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails inside Orbax
        raise TrainedExportError(f"The latest checkpoint of {workdir} cannot be read "
                                 f"({type(e).__name__}: {str(e)[:200]}); it is damaged.") from None
    finally:
        manager.close()
    cfg = meta.get("config") if isinstance(meta, dict) else None
    stage = cfg.get("stage") if isinstance(cfg, dict) else None
    return stage if isinstance(stage, str) else None


def load_trained(workdir: str, *, ema: bool = False, step: int | None = None):
    """(module, config, step) of the latest (or ``step``) checkpoint of a trainer workdir.

    ``ema=True`` takes the EMA of the parameters (an error if the run kept none)."""
    check_workdir(workdir)
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
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged checkpoint fails inside Orbax
        raise TrainedExportError(f"Checkpoint step {step} of {workdir} cannot be restored "
                                 f"({type(e).__name__}: {str(e)[:200]}); it is damaged or was "
                                 "written by another configuration.") from None
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


def check_export(workdir: str, out: str | None, name: str, *, stage: str | None = None,
                 hf_out: str | None = None, sampling: str | None = None,
                 overwrite: bool = True) -> None:
    """Every check of an export that needs no model: the component name (against the stage
    when known), the sampling preset and both output folders (:func:`check_workdir` checks
    the workdir)."""
    if out:
        if not isinstance(name, str) or not pipeline_folder._NAME.match(name):
            raise TrainedExportError(f"--name {name!r}: a component name is 1 to 64 letters, "
                                     "digits and underscores (e.g. decoder, prior, sr64).")
        if stage == "clip" and name not in ("clip", "text_encoder"):
            raise TrainedExportError(f"A CLIP run exports as 'clip' (both towers) or "
                                     f"'text_encoder' (text tower only), not {name!r}.")
    if hf_out and stage is not None and stage != "clip":
        raise TrainedExportError(f"--hf-out writes a CLIP; {workdir} trained stage {stage!r}.")
    if sampling is not None and sampling not in SAMPLING_PRESETS:
        raise TrainedExportError(f"Unknown sampling preset {sampling!r}; known: "
                                 f"{', '.join(SAMPLING_PRESETS)}.")
    if out:
        pipeline_folder.check_output(out, overwrite=overwrite, adding=[name])
    if hf_out:
        outputs.check_folder(hf_out, will_write=[hf_clip.CONFIG_NAME, hf_clip.SAFETENSORS_NAME],
                             overwrite=overwrite, flag="--hf-out")
        if out and paths.absolute(hf_out) == paths.absolute(out):
            raise TrainedExportError("--hf-out and --out must be different folders.")


def export_workdir(workdir: str, out: str | None, name: str, *, ema: bool = False,
                   dtype: str | None = None, hf_out: str | None = None,
                   sampling: str | None = None, context_length: int | None = None,
                   overwrite: bool = True) -> dict:
    """Write the model of ``workdir`` as component ``name`` of the pipeline folder ``out`` (and,
    for CLIP, optionally as a Hugging Face folder ``hf_out``). Returns a summary dict.

    ``out`` must be new, empty or a pipeline folder; a component already there (or, for
    ``hf_out``, its files) is replaced only with ``overwrite`` (the CLI's ``--overwrite``).
    Other components and any other files in ``out`` are kept; the folder switches to the new
    manifest atomically (see :func:`unclip_jax.io.pipeline_folder.save_folder_atomically`)."""
    check_export(workdir, out, name, hf_out=hf_out, sampling=sampling, overwrite=overwrite)
    module, config, step = load_trained(workdir, ema=ema)
    check_export(workdir, out, name, stage=config.stage, hf_out=hf_out, sampling=sampling,
                 overwrite=overwrite)
    summary: dict[str, Any] = {"workdir": workdir, "step": step, "stage": config.stage,
                               "ema": ema}
    if config.stage == "clip":
        if hf_out:
            paths.makedirs(hf_out)
            hf_clip.save_pretrained(module, hf_out)
            summary["hf_out"] = hf_out
        if name == "text_encoder":
            module = text_encoder_of(module)
    if not out:
        return summary

    def write(tmp: str) -> None:
        old = (pipeline_folder.read_manifest(out)
               if paths.isfile(pipeline_folder.manifest_path(out)) else None)
        entry = pipeline_folder.save_component(tmp, name, module, dtype=dtype,
                                               update_manifest=False)
        components = dict(old["components"]) if old else {}
        components[name] = entry
        tokenizer = dict(old["tokenizer"]) if old else {}
        existing = copy.deepcopy(old["sampling"]) if old else {}
        new_sampling = existing
        if sampling is not None:
            new_sampling = copy.deepcopy(SAMPLING_PRESETS[sampling])
            # a preset never overrides what an exported decoder recorded of its training
            for key in ("prediction_type", "uncond_text"):
                kept = existing.get("decoder", {}).get(key)
                if kept:
                    new_sampling["decoder"][key] = kept
        if config.stage == "decoder":
            # the sampler must read the model's output as what it was trained to predict
            new_sampling.setdefault("decoder", {})["prediction_type"] = str(
                config.diffusion.get("prediction_type", "epsilon"))
            # guidance's unconditional caption is what this trainer's caption dropout shows
            new_sampling["decoder"]["uncond_text"] = "dropped"
        if config.stage == "clip":
            ctx = int(context_length or module.config.context_length)
            tokenizer = {"kind": "clip_bpe", "vocab": "bpe_simple_vocab_16e6",
                         "context_length": ctx, "pad_id": int(get_tokenizer(ctx).pad_id)}
        pipeline_folder.save_manifest(tmp, components=components, tokenizer=tokenizer,
                                      sampling=new_sampling, replace=True)
        summary.update(out=out, name=name, cls=entry["class"],
                       bytes=paths.getsize(paths.join(tmp, entry["weights"])))

    pipeline_folder.save_folder_atomically(out, write, overwrite=overwrite, adding=[name])
    return summary
