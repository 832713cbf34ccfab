"""Training stage of the autoregressive prior (Ramesh et al. 2022, section 2.1, Table 3).

Batches are dicts of (caption, z_t, z_i) arrays, the keys of
:func:`unclip_jax.data.synthetic_embeddings.sample_prior_batch`:

  text_hidden [B, L, W] float   CLIP text hidden states of the caption
  text_mask   [B, L] bool       true on real tokens
  text_embed  [B, D] float      z_t
  image_embed [B, D] float      z_i

The stage, in order of use:

1. ``model = build_model(config)`` (an :class:`ARPrior` from an ``ARPriorConfig`` or a config
   dict) and ``fit_prior_quantizer(model, batches)``: the PCA and bucket edges are fitted on the
   training z_i once, before training, and stored in the model's buffers (so every checkpoint of
   the model carries them). The trainer must checkpoint the whole ``nnx.state(model)`` (params and
   ``rest``), not the params alone.
2. ``tx = make_optimizer(TABLE3["ar_prior"])`` (unclip_jax.train.optimizer): AdamW, Table 3 (beta2 0.91, eps 1e-10,
   decoupled weight decay 4e-2 on matrices, lr 1.6e-4).
3. ``train_step, state, graphdef, rest = build_train_step(model, tx)``: the pure
   ``train_step(state, batch, rng) -> (state, metrics)`` of :func:`unclip_jax.train.step.
   make_train_step` around :func:`loss_fn`, with an EMA (0.999 in Table 3).

:func:`loss_fn` encodes z_i into its K bucket tokens and z_i . z_t into the dot token (both with
the frozen quantiser), drops the text conditioning of a random ``text_drop_prob`` of the rows
(classifier-free guidance; 10% in the paper), and returns the mean cross-entropy over the K
tokens. Metrics: ``ce`` (nats per token), ``accuracy`` (next-token top-1) and ``text_dropped``.

In the trainer (``STAGE``) the quantiser is fitted by the ``prepare`` hook on the first
``config.quantizer.fit_examples`` examples, and ``sample`` reports the cosines of sampled z_i.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unclip_jax.evaluate.prior_metrics import prior_cosines
from unclip_jax.models import ar_prior
from unclip_jax.models.ar_prior import ARPrior, ARPriorConfig
from unclip_jax.models.pca_quantizer import QuantizerFit, fit_quantizer
from unclip_jax.train import step as step_lib
from unclip_jax.train.optimizer import TABLE3, make_optimizer
from unclip_jax.train.stage import Stage, StageConfigError, cosine_means, model_fields
from unclip_jax.train.step import TrainState

BATCH_KEYS = ("text_hidden", "text_mask", "text_embed", "image_embed")


def build_model(config: ARPriorConfig | Mapping[str, Any], seed: int = 0) -> ARPrior:
    """An unfitted :class:`ARPrior` from a config dataclass or a dict of its fields."""
    if not isinstance(config, ARPriorConfig):
        fields = {f.name for f in dataclasses.fields(ARPriorConfig)}
        config = ARPriorConfig(**{k: v for k, v in dict(config).items() if k in fields})
    return ARPrior(config, rngs=nnx.Rngs(seed))


def model_config(c: Any) -> ARPriorConfig:
    """The :class:`ARPriorConfig` of a ``configs/ar_prior.py`` ConfigDict."""
    return ARPriorConfig(**model_fields(ARPriorConfig, c.model))


def fit_prior_quantizer(model: ARPrior, batches: Iterable | Callable[[], Iterable],
                        max_quantile_samples: int = 1 << 17, seed: int = 0) -> QuantizerFit:
    """Fit the PCA and both quantisers on ``batches`` (see ``fit_quantizer``) with the model's
    sizes, load the fit into the model and return it (``fit.energy_report()`` to log)."""
    cfg = model.config
    fit = fit_quantizer(batches, cfg.num_components, cfg.num_buckets, cfg.num_dot_buckets,
                        max_quantile_samples=max_quantile_samples, seed=seed)
    model.quantizer.load_fit(fit)
    return fit


def make_loss_fn(text_drop_prob: float = 0.1):
    """The stage's ``loss_fn(model, batch, rng) -> (loss, metrics)``."""
    if not 0.0 <= text_drop_prob < 1.0:
        raise ValueError(f"text_drop_prob must be in [0, 1), got {text_drop_prob}.")

    def loss_fn(model: ARPrior, batch, rng: jax.Array):
        missing = [k for k in BATCH_KEYS if k not in batch]
        if missing:
            raise ValueError(f"AR prior batches need {list(BATCH_KEYS)}; missing {missing}.")
        z_i = jnp.asarray(batch["image_embed"], jnp.float32)
        z_t = jnp.asarray(batch["text_embed"], jnp.float32)
        q = model.quantizer
        tokens = jax.lax.stop_gradient(q.encode(z_i))
        dot_tokens = jax.lax.stop_gradient(q.encode_dot(jnp.sum(z_i * z_t, axis=-1)))
        rng_drop, rng_dropout = jax.random.split(rng)
        drop = jax.random.bernoulli(rng_drop, text_drop_prob, (z_i.shape[0],))
        logits = model(tokens, dot_tokens, z_t, batch["text_hidden"], batch["text_mask"], drop,
                       deterministic=False, rng=rng_dropout)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
        loss = jnp.mean(ce)
        metrics = {"ce": loss,
                   "accuracy": jnp.mean(jnp.argmax(logits, -1) == tokens),
                   "text_dropped": jnp.mean(drop.astype(jnp.float32))}
        return loss, metrics

    return loss_fn


loss_fn = make_loss_fn()


def build_train_step(model: ARPrior, tx: optax.GradientTransformation | None = None,
                     ema_decay: float | None = 0.999, text_drop_prob: float = 0.1
                     ) -> tuple[Callable, TrainState, nnx.GraphDef, nnx.State]:
    """(train_step, initial TrainState, graphdef, rest) for ``model`` (its quantizer fitted).

    ``train_step(state, batch, rng)`` is pure and not jitted (jit it, donating ``state``).
    ``nnx.merge(graphdef, state.params, rest)`` (or ``state.ema``) gives the trained model back.
    """
    model.quantizer.require_fitted()
    tx = tx or make_optimizer(TABLE3["ar_prior"])
    return step_lib.build_train_step(model, make_loss_fn(text_drop_prob), tx, ema_decay)


# --------------------------------------------------------------------------------------------
# The trainer's hooks
# --------------------------------------------------------------------------------------------

def _prepare(model, c, batches) -> dict:
    q = c.get("quantizer")
    pairs = [{"image_embed": b["image_embed"], "text_embed": b["text_embed"]} for b in batches]
    fit = fit_prior_quantizer(model, pairs, seed=c.seed,
                              max_quantile_samples=q.get("max_quantile_samples", 1 << 17)
                              if q is not None else 1 << 17)
    return {"quantizer_examples": sum(len(b["image_embed"]) for b in batches),
            "quantizer": fit.energy_report()}


def _prepare_batches(c) -> int:
    q = c.get("quantizer")
    examples = q.get("fit_examples", 2048) if q is not None else 2048
    return max(1, math.ceil(examples / c.batch_size))


def _sample(model, c, batch, rng):
    s = c.get("sample")
    kw = {} if s is None else dict(best_of=s.best_of,
                                   guidance_scale=s.guidance_scale, temperature=s.temperature,
                                   top_p=s.top_p, dot_percentile=s.dot_percentile)
    z = ar_prior.sample(model, batch["text_embed"], batch["text_hidden"], batch["text_mask"], rng,
                        **kw)
    return cosine_means(prior_cosines(z["image_embed"], batch["image_embed"],
                                      batch["text_embed"])), None


def check_settings(c) -> None:
    """The stage's own settings (text_drop_prob, quantizer, sample), refused in one
    StageConfigError before anything is built."""
    make_loss_fn(c.get("text_drop_prob", 0.1))
    problems = []
    q = c.get("quantizer") or {}
    for name in ("fit_examples", "max_quantile_samples"):
        v = q.get(name, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"quantizer.{name} must be an integer >= 1, got {v!r}")
    smp = c.get("sample") or {}
    checks = (("temperature", lambda v: v > 0, "> 0"),
              ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
              ("dot_percentile", lambda v: 0 <= v <= 100, "in [0, 100]"),
              ("guidance_scale", lambda v: True, "finite"))
    for name, ok, span in checks:
        v = smp.get(name, 1.0)
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or not ok(v)):
            problems.append(f"sample.{name} must be a number {span}, got {v!r}")
    best_of = smp.get("best_of", 1)
    if not isinstance(best_of, int) or isinstance(best_of, bool) or best_of < 1:
        problems.append(f"sample.best_of must be an integer >= 1, got {best_of!r}")
    if problems:
        raise StageConfigError("; ".join(problems) + ". Fix them in the config file or with "
                               "--config.KEY=VALUE.")


STAGE = Stage("ar_prior", build_model=lambda c, rngs: ARPrior(model_config(c), rngs=rngs),
              make_loss_fn=lambda c: make_loss_fn(c.get("text_drop_prob", 0.1)),
              batch_keys=lambda c: BATCH_KEYS, prepare=_prepare,
              prepare_batches=_prepare_batches, sample=_sample, model_config=model_config,
              check_settings=check_settings)
