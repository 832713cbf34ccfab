"""Training stage of the diffusion prior: x0-prediction MSE on normalised z_i.

A batch is a dict of arrays:
  image_embed [B, D]      z_i (the target)
  text_embed  [B, Dt]     z_t
  text_hidden [B, L, W]   encoded caption tokens
  text_mask   [B, L] bool real tokens
  (only for priors without a learned null) null_text_embed [Dt], null_text_hidden [L, W],
  null_text_mask [L] (or with a leading batch axis): the unconditional conditioning, e.g. the CLIP encoding of the empty
  caption, as diffusers' pipelines use at sampling time.

The loss (paper section 2.2): z_i is normalised (``DiffusionPrior.normalise``), t ~ U{0..T-1},
x_t = q_sample(z_i, t, eps), and the prior's output is regressed onto the clean z_i. With
probability ``cond_drop_prob`` (10%) a caption's text conditioning is replaced by the null one,
for classifier-free guidance. The optimizer is AdamW as in Table 3 (lr 1.1e-4, beta2 0.96,
eps 1e-6, decoupled weight decay 6e-2 on Linear kernels only), with the EMA of the parameters kept by
the shared train step (decay 0.9999).

Hooks for the trainer (``STAGE``): ``prepare`` sets the per-dimension z_i mean/std of a prior
with embed_norm='mean_std' from a few batches; ``sample`` draws z_i with the config's sampler and
reports their cosines to the true z_i and to z_t (:func:`unclip_jax.evaluate.prior_metrics.
prior_cosines`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax import diffusion
from unclip_jax.evaluate.prior_metrics import prior_cosines
from unclip_jax.models.diffusion_prior import (DiffusionPrior, PriorConfig, TextConditioning,
                                               drop_text_conditioning)
from unclip_jax.models.prior_sampling import prior_settings, sample_prior
from unclip_jax.train import step as step_lib
from unclip_jax.train.optimizer import TABLE3, OptimizerConfig, from_config_dict, make_optimizer
from unclip_jax.train.stage import (Stage, check_diffusion_settings, cosine_means,
                                    model_fields)

NULL_KEYS = ("null_text_embed", "null_text_hidden", "null_text_mask")


@dataclasses.dataclass(frozen=True)
class PriorStageConfig:
    num_train_steps: int = 1000
    schedule: str = "cosine"
    cond_drop_prob: float = 0.1

    def __post_init__(self):
        check_diffusion_settings(self, ("cond_drop_prob",))


def _check_batch(model: DiffusionPrior, batch: dict) -> None:
    need = ["image_embed", "text_embed", "text_hidden", "text_mask"]
    if not model.config.learned_null:
        need += list(NULL_KEYS)
    missing = [k for k in need if k not in batch]
    if missing:
        extra = ("" if model.config.learned_null or not set(missing) & set(NULL_KEYS) else
                 " The prior has no learned null (learned_null=False), so the batch must carry "
                 "the unconditional conditioning (e.g. the CLIP encoding of the empty caption) "
                 "as null_text_embed [Dt], null_text_hidden [L, W], null_text_mask [L]; or build "
                 "the prior with learned_null=True.")
        raise KeyError(f"The diffusion-prior batch lacks {missing}; it has {sorted(batch)}.{extra}")


def make_loss_fn(cfg: PriorStageConfig = PriorStageConfig()):
    """``loss_fn(model, batch, rng) -> (loss, metrics)`` for :func:`step.make_train_step`."""
    schedule = diffusion.get_schedule(cfg.schedule, cfg.num_train_steps)

    def loss_fn(model: DiffusionPrior, batch: dict, rng: jax.Array):
        _check_batch(model, batch)
        drop_key, diff_key, dropout_key = jax.random.split(rng, 3)
        z = model.normalise(batch["image_embed"])
        b = z.shape[0]
        drop = jax.random.bernoulli(drop_key, cfg.cond_drop_prob, (b,))
        cond = TextConditioning(jnp.asarray(batch["text_embed"]), jnp.asarray(batch["text_hidden"]),
                                jnp.asarray(batch["text_mask"]).astype(bool))
        learned = model.config.learned_null
        if not learned:
            null = TextConditioning(*(jnp.asarray(batch[k]) for k in NULL_KEYS))
            cond = drop_text_conditioning(cond, null, drop)

        def model_fn(x_t, t):
            return model(x_t, t, *cond, drop_text=drop if learned else None,
                         deterministic=False, dropout_rng=dropout_key)

        loss, terms = diffusion.diffusion_loss(model_fn, schedule, z, diff_key,
                                               prediction_type="sample")
        return loss, {"mse": jnp.mean(terms["mse"]), "text_dropped": jnp.mean(drop)}

    return loss_fn


def build_train_step(model: DiffusionPrior, stage: PriorStageConfig = PriorStageConfig(),
                     tx: optax.GradientTransformation | None = None,
                     ema_decay: float | None = 0.9999):
    """(train_step, initial TrainState, graphdef, rest) for ``model``.

    ``train_step(state, batch, rng) -> (state, metrics)`` is the shared pure step
    (:func:`unclip_jax.train.step.make_train_step`), not yet jitted. Rebuild the model from a
    state with ``nnx.merge(graphdef, state.params, rest)`` (``state.ema`` for the EMA weights).
    """
    tx = make_optimizer(TABLE3["diffusion_prior"]) if tx is None else tx
    return step_lib.build_train_step(model, make_loss_fn(stage), tx, ema_decay)


def from_config(c: Any) -> tuple[PriorStageConfig, OptimizerConfig]:
    """Stage and optimizer settings from a ``configs/diffusion_prior.py`` ConfigDict."""
    stage = PriorStageConfig(num_train_steps=c.diffusion.num_train_steps,
                             schedule=c.diffusion.schedule,
                             cond_drop_prob=c.diffusion.cond_drop_prob)
    return stage, from_config_dict(c.optimizer, total_steps=c.total_steps)


def model_config(c: Any) -> PriorConfig:
    """The :class:`PriorConfig` of a ``configs/diffusion_prior.py`` ConfigDict."""
    return PriorConfig(**model_fields(PriorConfig, c.model))


def sampling_config(c: Any) -> dict[str, Any]:
    """``sample_prior``'s keyword arguments (spec, guidance_scale, best_of) of a
    ``configs/diffusion_prior.py`` ConfigDict."""
    return prior_settings(c.sampling.to_dict())


def embedding_stats(batches: Iterable[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of z_i over batches [B, D] (float64 sums, float32 result),
    for ``DiffusionPrior.set_embedding_stats`` before training with embed_norm='mean_std'."""
    n, total, squares = 0, None, None
    for z in batches:
        z = np.asarray(z, np.float64).reshape(-1, np.shape(z)[-1])
        if total is None:
            total, squares = np.zeros(z.shape[1]), np.zeros(z.shape[1])
        n += z.shape[0]
        total += z.sum(0)
        squares += np.square(z).sum(0)
    if not n:
        raise ValueError("embedding_stats got no embeddings.")
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - np.square(mean), 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


# --------------------------------------------------------------------------------------------
# The trainer's hooks
# --------------------------------------------------------------------------------------------

def _batch_keys(c) -> tuple[str, ...]:
    keys = ("image_embed", "text_embed", "text_hidden", "text_mask")
    return keys if model_config(c).learned_null else keys + NULL_KEYS


def _prepare(model, c, batches) -> dict:
    if model.config.embed_norm != "mean_std":
        return {}
    mean, std = embedding_stats(b["image_embed"] for b in batches)
    model.set_embedding_stats(jnp.asarray(mean), jnp.asarray(std))
    return {"embedding_stats_examples": sum(len(b["image_embed"]) for b in batches)}


def _sample(model, c, batch, rng):
    cond = TextConditioning(batch["text_embed"], batch["text_hidden"], batch["text_mask"])
    uncond = None
    if not model.config.learned_null and "null_text_embed" in batch:
        uncond = TextConditioning(batch["null_text_embed"], batch["null_text_hidden"],
                                  batch["null_text_mask"])
    z = sample_prior(model, cond, rng, **sampling_config(c), uncond=uncond)["image_embed"]
    return cosine_means(prior_cosines(z, batch["image_embed"], batch["text_embed"])), None


STAGE = Stage("diffusion_prior",
              build_model=lambda c, rngs: DiffusionPrior(model_config(c), rngs=rngs),
              make_loss_fn=lambda c: make_loss_fn(from_config(c)[0]),
              batch_keys=_batch_keys, prepare=_prepare, prepare_batches=lambda c: 4,
              sample=_sample, model_config=model_config,
              check_settings=from_config)
