"""One trainer for every stage: ``train(config, workdir)``.

It reads top to bottom in banner-marked sections (big_vision style):

  stage       which model / loss / batch keys / hooks (unclip_jax.train.registry)
  mesh        ('data', 'fsdp', 'tensor') from ``config.mesh`` (unclip_jax.train.sharding)
  model + optimizer via eval_shape: shapes only, nothing allocated
  sharding    parameter / optimizer-state / batch shardings from the logical axis names
  resume      an existing checkpoint in WORKDIR is checked against this config (refused with a
              clear message, before anything is written, if it does not match) and restored
              onto this mesh; a newer one that cannot be read (truncated, garbled) is reported,
              renamed ``<step>.corrupt-<time>`` once an older one restores, and skipped;
              otherwise the state is CREATED sharded (``jit`` with
              ``out_shardings``: no host copy of a large model) and the stage's ``prepare`` hook
              fits its buffers (the AR prior's quantiser) from a few whole global batches
  input       per-process batches from the saved data position -> global arrays
  update step ``jax.jit(step, in_shardings, out_shardings, donate_argnums=0)``, lowered and
              compiled once; its FLOPs give TFLOP/s per device
  loop        steps; metrics every ``log_every``; checkpoints every ``checkpoint.every_steps``,
              at the end, and on SIGTERM (then exit 0); the stage's sample hook every
              ``eval_every`` steps

A NaN or Inf in the loss or the gradient norm stops the run with :class:`NonFiniteError`
(naming the step and the metric) before any later checkpoint is written, so the last good one
stays the latest. The rng of step ``s`` is ``fold_in(key(seed), s)`` and batch ``s`` is a pure
function of (seed, s): a run restarted from its checkpoint ends bitwise where an uninterrupted
one would.

Gradient accumulation: ``config.optimizer.accum_steps`` > 1 splits each global batch into that
many microbatches (``step.make_train_step``'s ``accum_steps``: a ``lax.scan``, gradients and
metrics averaged), so the peak activation memory is one microbatch's. Mixed precision: the model's compute dtype is
``config.model.dtype`` (e.g. ``--config.model.dtype=bfloat16``); parameters and optimizer state
stay in ``param_dtype`` (float32). Rematerialisation: ``config.model.remat`` where the model has
it.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from unclip_jax.errors import UserError
from unclip_jax.models.layers import abstract_init, plain_tracer_errors
from unclip_jax.io import paths
from unclip_jax.train import checkpoint as ckpt
from unclip_jax.train import inputs as inputs_lib
from unclip_jax.train import sharding as shard_lib
from unclip_jax.train import step as step_lib
from unclip_jax.train.checks import TrainConfigError, check_config, check_workdir
from unclip_jax.train.metrics import MetricWriter, compiled_flops, model_flops
from unclip_jax.train.optimizer import (ema_decay, learning_rate_schedule, make_optimizer,
                                        optimizer_config)
from unclip_jax.train.registry import get_stage


class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradients became NaN / Inf."""


def _to_train_state(s: dict) -> step_lib.TrainState:
    return step_lib.TrainState(s["step"], s["params"], s["opt_state"], s.get("ema"))


def _from_train_state(ts: step_lib.TrainState, rest) -> dict:
    out = {"step": ts.step, "params": ts.params, "opt_state": ts.opt_state, "rest": rest}
    if ts.ema is not None:
        out["ema"] = ts.ema
    return out


def _check_finite(step: int, metrics: dict) -> None:
    values = jax.device_get({k: metrics[k] for k in ("loss", "grad_norm")})
    bad = [f"{k}={float(v)}" for k, v in values.items() if not np.isfinite(v)]
    if bad:
        raise NonFiniteError(
            f"Training diverged at step {step}: {', '.join(bad)}. Nothing was saved after the "
            "last good checkpoint; lower the learning rate (config.optimizer.learning_rate), "
            "enable clipping (config.optimizer.grad_clip_norm) or check the data, then rerun "
            "the same command to resume from that checkpoint.")


def build_setup(config: Any, stage=None) -> dict:
    """Everything about the model and optimizer of ``config`` that needs no devices: the stage,
    graphdef, the abstract train state (dict of step, params, opt_state, [ema], rest), the
    optax transformation, its learning-rate schedule, the EMA decay and ``init_fn`` (a pure
    function creating the state, for ``jax.jit(init_fn, out_shardings=...)``)."""
    stage = stage or get_stage(config.stage)
    opt_cfg = optimizer_config(config)
    tx = make_optimizer(opt_cfg)
    decay = ema_decay(config)

    def build():
        return stage.build_model(config, nnx.Rngs(config.seed))

    graphdef, _, _ = step_lib.split_model(abstract_init(build))

    def init_fn():
        _, params, rest = step_lib.split_model(build())
        ts = step_lib.init_train_state(params, tx, ema=decay is not None)
        return _from_train_state(ts, rest)

    with plain_tracer_errors():
        abstract = jax.eval_shape(init_fn)
    return {"stage": stage, "graphdef": graphdef, "abstract": abstract, "tx": tx,
            "opt_cfg": opt_cfg, "lr_fn": learning_rate_schedule(opt_cfg), "ema_decay": decay,
            "init_fn": init_fn}


def state_shardings(abstract: dict, mesh, rules=None, min_shard_bytes: int = 0) -> dict:
    """NamedShardings of a train-state dict on ``mesh`` (see unclip_jax.train.sharding)."""
    rules = shard_lib.parse_rules(rules) if not isinstance(rules, dict) else rules
    param_sh = shard_lib.tree_shardings(abstract["params"], mesh, rules, min_shard_bytes)
    out = {"step": NamedSharding(mesh, P()), "params": param_sh,
           "opt_state": shard_lib.mirror_shardings(abstract["opt_state"], abstract["params"],
                                                   param_sh, mesh),
           "rest": shard_lib.replicated(abstract["rest"], mesh)}
    if "ema" in abstract:
        out["ema"] = param_sh
    return out


def image_grid(images, columns: int = 8) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, columns*W, C] grid."""
    x = np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255).astype(np.uint8)
    n, h, w, ch = x.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    grid = np.full((rows * h, columns * w, ch), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = x[i]
    return grid


def _section(title: str, log) -> None:
    log(f"== {title} " + "=" * max(0, 70 - len(title)))


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------

def train(config: Any, workdir: str, *, progress: bool = True) -> dict:
    """Train ``config`` (a configs/*.py ConfigDict) in ``workdir``, resuming if it holds a
    checkpoint. Returns a summary: final step, last metrics, steps/s, whether it resumed.

    Every setting is checked first (:mod:`unclip_jax.train.checks`): a config or workdir the
    trainer cannot use is refused before anything is built or written. Nothing is written to
    ``workdir`` until the state is restored (or created) and the input opens."""
    check_config(config)
    workdir = check_workdir(workdir)
    is_main = jax.process_index() == 0
    writer = None
    early: list[str] = []   # lines logged before the workdir is written to

    def log(msg: str) -> None:
        if is_main:
            print(msg, flush=True)
            if writer is None:
                early.append(msg)
            else:
                writer.text(msg)

    # ---------------------------------------------------------------- stage
    stage = get_stage(config.stage)
    batch_keys = stage.batch_keys(config)
    total_steps = int(config.total_steps)
    ckpt_cfg = config.get("checkpoint") or {}
    every = int(ckpt_cfg.get("every_steps", 1000))
    keep = int(ckpt_cfg.get("keep", 3))
    log_every = int(config.get("log_every", 100))
    eval_every = int(config.get("eval_every", 0) or 0)
    accum = int(config.optimizer.get("accum_steps", 1))

    # ---------------------------------------------------------------- mesh
    _section("mesh", log)
    mesh_cfg = config.get("mesh")
    mesh = shard_lib.make_mesh(mesh_cfg)
    rules = shard_lib.parse_rules(mesh_cfg.get("rules") if mesh_cfg is not None else None)
    min_bytes = int(mesh_cfg.get("min_shard_bytes", 0)) if mesh_cfg is not None else 0
    batch_size = int(config.batch_size)
    divisor = shard_lib.batch_divisor(mesh) * accum
    if batch_size % jax.process_count():
        raise TrainConfigError(
            f"batch_size {batch_size} does not split over {jax.process_count()} processes; make "
            "config.batch_size a multiple of the number of processes.")
    if batch_size % divisor:
        raise TrainConfigError(
            f"batch_size {batch_size} must be a multiple of data x fsdp x accum_steps = "
            f"{divisor} (mesh {dict(mesh.shape)}); change config.batch_size or the mesh.")
    log(f"{jax.process_count()} process(es), {jax.device_count()} devices "
        f"({jax.devices()[0].platform}); mesh {dict(mesh.shape)}; global batch {batch_size}"
        + (f" in {accum} microbatches" if accum > 1 else ""))

    # ---------------------------------------------------------------- model + optimizer
    _section("model and optimizer (eval_shape)", log)
    setup = build_setup(config, stage)
    graphdef, abstract, tx, lr_fn, decay, init_fn = (setup[k] for k in (
        "graphdef", "abstract", "tx", "lr_fn", "ema_decay", "init_fn"))
    opt_cfg = setup["opt_cfg"]
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract["params"]))
    log(f"stage {stage.name}: {n_params:,} parameters; optimizer AdamW lr "
        f"{opt_cfg.learning_rate:g} ({opt_cfg.lr_schedule}); EMA {decay}")

    # ---------------------------------------------------------------- sharding
    _section("sharding", log)
    state_sh = state_shardings(abstract, mesh, rules, min_bytes)
    param_sh = state_sh["params"]
    replicated = NamedSharding(mesh, P())
    for line in shard_lib.describe(abstract["params"], param_sh, limit=6):
        log("  " + line)
    row_sh = shard_lib.batch_sharding(mesh)
    batch_sh = {k: row_sh for k in batch_keys}

    # ---------------------------------------------------------------- resume
    _section("resume", log)
    async_save = bool(ckpt_cfg.get("async_save", False))
    manager = None
    latest = None
    if paths.isdir(ckpt.checkpoint_dir(workdir)):   # else: nothing to read, nothing created yet
        manager = ckpt.make_manager(workdir, keep=keep, async_save=async_save)
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              abstract, state_sh)
        try:
            manager, state, meta, latest = ckpt.restore_newest(workdir, manager, target, config,
                                                               log=log)
        except BaseException:
            manager.close()
            raise
    if latest is not None:
        start = int(meta["step"])
        data_position = int(meta.get("data_position", start))
        log(f"resumed from step {start} (checkpoint {latest}, data position {data_position})")
    else:
        with plain_tracer_errors():
            state = jax.jit(init_fn, out_shardings=state_sh)()
        start, data_position = 0, 0
        if stage.prepare is not None and stage.prepare_batches(config) > 0:
            batches = inputs_lib.host_global_batches(
                config.input, global_batch_size=batch_size, seed=config.seed + 7919,
                count=stage.prepare_batches(config), keys=batch_keys)
            # writable host copies: prepare() sets buffers (quantiser fit, embedding stats)
            rest_host = jax.tree.map(np.array, jax.device_get(state["rest"]))
            model = nnx.merge(graphdef, abstract["params"], rest_host)
            with _settings_do_not_fit("the batches of config.input and the model "
                                      "(config.model)"):
                info = stage.prepare(model, config, batches)
            _, _, rest = step_lib.split_model(model)
            state["rest"] = jax.device_put(rest, state_sh["rest"])
            if info:
                log(f"prepared: {info}")
        log("fresh start (no checkpoint in the workdir)")
    per_device = shard_lib.bytes_per_device({k: state[k] for k in ("params", "opt_state")})
    total_bytes = sum(x.size * x.dtype.itemsize for x in
                      jax.tree.leaves({k: state[k] for k in ("params", "opt_state")}))
    log(f"params + optimizer state: {total_bytes / 2**20:.2f} MiB in all, at most "
        f"{max(per_device.values()) / 2**20:.2f} MiB on one device")
    if start >= total_steps:
        log(f"nothing to do: step {start} >= total_steps {total_steps}")
        if manager is not None:
            manager.close()
        return {"step": start, "resumed_from": start, "metrics": {}, "steps_per_s": None}

    # ---------------------------------------------------------------- input
    _section("input", log)
    it = inputs_lib.make_input(config.input, global_batch_size=batch_size, seed=config.seed,
                               process_index=jax.process_index(),
                               process_count=jax.process_count(), start_batch=data_position)

    def next_batch():
        return inputs_lib.to_global(inputs_lib.select(next(it), batch_keys), row_sh)

    try:
        batch = next_batch()

        # ------------------------------------------------------------ update step
        _section("update step", log)
        loss_fn = stage.make_loss_fn(config)

        def step_fn(s, batch, rng):
            fn = step_lib.make_train_step(graphdef, s["rest"], loss_fn, tx, decay, accum)
            ts, metrics = fn(_to_train_state(s), batch, rng)
            metrics = dict(metrics, learning_rate=lr_fn(s["step"]))
            return _from_train_state(ts, s["rest"]), metrics

        rng = jax.device_put(jax.random.PRNGKey(config.seed), replicated)
        t0 = time.perf_counter()
        with _settings_do_not_fit("the batches of config.input and the model (config.model)"):
            traced = jax.jit(step_fn, in_shardings=(state_sh, batch_sh, replicated),
                             out_shardings=(state_sh, replicated),
                             donate_argnums=0).trace(state, batch, rng)
        compiled = traced.lower().compile()
        # the model's FLOPs (matrix products and convolutions of the global step) per device;
        # XLA's count of the compiled program misses the library calls on GPU
        flops = model_flops(traced.jaxpr) / mesh.size or compiled_flops(compiled)
        log(f"compiled in {time.perf_counter() - t0:.1f} s; "
            + (f"{flops / 1e9:.3f} GFLOP per step per device" if flops else "FLOPs unknown"))

        sample_fn = None
        eval_batch = None
        if eval_every and stage.sample is not None:
            eval_batch = inputs_lib.host_global_batches(
                config.input, global_batch_size=batch_size, seed=config.seed + 104729, count=1,
                keys=batch_keys)[0]

            def sample_pure(params, rest, b, key):
                return stage.sample(nnx.merge(graphdef, params, rest), config, b, key)

            sample_fn = jax.jit(sample_pure)
            with _settings_do_not_fit("the sample hook (config.sampling, eval_every)"):
                jax.eval_shape(sample_fn, state.get("ema", state["params"]), state["rest"],
                               eval_batch, jax.random.PRNGKey(1))
    except BaseException:
        if manager is not None:
            manager.close()
        raise
    # from here on the run writes to the workdir: logs, metrics, checkpoints
    if manager is None:
        manager = ckpt.make_manager(workdir, keep=keep, async_save=async_save)
    writer = MetricWriter(workdir, active=is_main)
    for line in early:
        writer.text(line)

    # ---------------------------------------------------------------- loop
    _section("loop", log)
    stop = ckpt.StopFlag()
    bar = None
    if progress and is_main:
        bar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)
    last_metrics: dict = {}
    pending = None                      # (step, metrics) not yet checked for NaN
    t_log, steps_since_log = time.perf_counter(), 0
    t_start, first_step = time.perf_counter(), start
    step = start
    config_json = ckpt.config_json(config)

    def stop_requested() -> bool:
        flag = bool(stop)
        if jax.process_count() > 1:
            flag = bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
        return flag

    def save(done: int) -> None:
        meta = {"data_position": data_position + (done - start), "config": config_json,
                "input_position": _jsonable(getattr(it, "position", None))}
        ckpt.save_or_explain(manager, workdir, done, state, meta)

    try:
        while step < total_steps:
            if batch is None:
                batch = next_batch()
            state, metrics = compiled(state, batch, rng)
            batch = None
            if pending is not None:
                _check_finite(*pending)
            step += 1
            steps_since_log += 1
            pending = (step, metrics)
            if bar is not None:
                bar.update(1)
            stopping = stop_requested()
            if step % log_every == 0 or step == total_steps or stopping:
                _check_finite(*pending)
                host = jax.device_get(metrics)
                now = time.perf_counter()
                sps = steps_since_log / max(now - t_log, 1e-9)
                t_log, steps_since_log = now, 0
                last_metrics = {k: float(np.mean(v)) for k, v in host.items()}
                last_metrics.update(steps_per_s=sps, examples_per_s=sps * batch_size)
                if flops:
                    last_metrics["tflops_per_device"] = flops * sps / 1e12
                counts = getattr(it, "counts", None)
                if callable(counts):
                    last_metrics.update({f"input/{k}": v for k, v in counts().items()
                                         if isinstance(v, (int, float))})
                writer.scalars(step, last_metrics)
                if bar is not None:
                    bar.set_postfix(loss=f"{last_metrics['loss']:.4g}", refresh=False)
            if sample_fn is not None and (step % eval_every == 0 or step == total_steps):
                params = state.get("ema", state["params"])
                scalars, images = sample_fn(params, state["rest"], eval_batch,
                                            jax.random.fold_in(jax.random.PRNGKey(1), step))
                scalars = {f"eval/{k}": float(v) for k, v in jax.device_get(scalars).items()}
                writer.scalars(step, scalars)
                last_metrics.update(scalars)
                if images is not None:
                    writer.image(step, "samples", image_grid(jax.device_get(images)))
            if step % every == 0 or step == total_steps or stopping:
                _check_finite(*pending)
                save(step)
            if stopping:
                log(f"stopped by signal {stop.signum} at step {step}; checkpoint saved")
                break
        ckpt.wait_or_explain(manager, workdir, step)
    finally:
        stop.close()
        if bar is not None:
            bar.close()
        if sys.exc_info()[0] is None:
            manager.close()
        else:   # an error is on its way out: closing must not replace it
            ckpt.close_quietly(manager)
        writer.close()
    elapsed = time.perf_counter() - t_start
    summary = {"step": step, "resumed_from": start, "metrics": last_metrics,
               "steps_per_s": (step - first_step) / elapsed if elapsed > 0 else None,
               "flops_per_step_per_device": flops}
    log(f"done: step {step}, {summary['steps_per_s'] or 0:.2f} steps/s, loss "
        f"{last_metrics.get('loss', float('nan')):.5g}")
    return summary


@contextlib.contextmanager
def _settings_do_not_fit(what: str):
    """A ValueError while tracing (a shape check of the model or the sampler) is a config that
    does not fit together: one TrainConfigError, before anything is written."""
    try:
        with plain_tracer_errors():
            yield
    except UserError:
        raise
    except (ValueError, TypeError) as e:
        text = " ".join(str(e).split())[:400].rstrip(".")
        raise TrainConfigError(f"{what} do not fit together: {text}. Make the config agree "
                               "(nothing was written).") from None


def _jsonable(x):
    try:
        json.dumps(x)
        return x
    except TypeError:
        return repr(x)
