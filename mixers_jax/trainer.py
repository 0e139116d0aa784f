"""The training loop: mesh, state, data, checkpoints, logging; pure ``train_step``/``eval_step``.

``run(config, workdir)`` trains one model. It validates everything that can be wrong with the
input *before* it writes into the workdir, resumes automatically from the workdir's latest
checkpoint, stops on a non-finite loss without saving the broken state, and turns SIGTERM into
"save, then exit cleanly".
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax import flops as flops_lib
from mixers_jax import metrics as metrics_lib
from mixers_jax import objectives, sharding
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic
from mixers_jax.models import build_model, input_length

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
RESULTS_FILE = "results.json"


# --------------------------------------------------------------------------- optimizer


def lr_schedule(train_cfg) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0, then linear (or cosine) decay to exactly 0 at the final step.

    REFERENCE §1: lr(t) = η·t/w for t < w and η·(T−t)/(T−w) afterwards, so the first update uses lr 0.
    """
    peak, warmup, total = float(train_cfg.lr), int(train_cfg.warmup_steps), int(train_cfg.steps)
    warmup = min(warmup, total)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        warm = peak * t / max(warmup, 1)
        frac = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if train_cfg.schedule == "cosine":
            decay = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            decay = peak * (1.0 - frac)
        return jnp.where(t < warmup, warm, decay)

    return schedule


def make_optimizer(train_cfg) -> optax.GradientTransformation:
    """AdamW (weight decay 0 by default, i.e. Adam) after global-norm clipping (REFERENCE §1)."""
    return optax.chain(
        optax.clip_by_global_norm(float(train_cfg.clip_norm)),
        optax.adamw(
            lr_schedule(train_cfg),
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay),
        ),
    )


# --------------------------------------------------------------------------- state and steps


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass
class Steps:
    """Everything compiled for one (model, optimizer, mesh): init, train step, eval step."""

    model: nn.Module
    mesh: jax.sharding.Mesh
    state_shardings: Any
    abstract_state: Any
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the config fields the trainer relies on; raises UserError naming the problem."""
    t = config.train
    if t.steps <= 0:
        raise UserError(f"train.steps must be positive, got {t.steps}")
    if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
        raise UserError(
            f"train.batch_size={t.batch_size} must divide by train.grad_accum={t.grad_accum}"
        )
    if t.schedule not in ("linear", "cosine"):
        raise UserError(f"train.schedule must be 'linear' or 'cosine', got {t.schedule!r}")
    if config.data.packing not in ("concat", "pad"):
        raise UserError(f"data.packing must be 'concat' or 'pad', got {config.data.packing!r}")
    if config.model.dtype not in ("float32", "bfloat16"):
        raise UserError(f"model.dtype must be 'float32' or 'bfloat16', got {config.model.dtype!r}")
    profile_window(config)
    sharding.resolve(config)


def profile_window(config) -> tuple[int, int] | None:
    """``train.profile_steps='a:b'`` -> (a, b): trace the steps a, ..., b-1 (0-based); '' -> None."""
    text = str(config.train.get("profile_steps", "") or "").strip()
    if not text:
        return None
    a, sep, b = text.partition(":")
    try:
        start, stop = int(a), int(b)
    except ValueError:
        start, stop = -1, -1
    if not sep or start < 0 or stop <= start:
        raise UserError(f"train.profile_steps must look like 'a:b' with 0 <= a < b, got {text!r}")
    return start, stop


def activation_dims(model_cfg) -> dict[str, int]:
    """Sizes of the activation axes the models constrain (to replicate what a mesh cannot split)."""
    heads = model_cfg.heads if model_cfg.kind == "mixer" else model_cfg.n_heads
    return {"act_heads": int(heads or 1), "act_mlp": int(model_cfg.mlp_ratio * model_cfg.d_model)}


def build_steps(config, mesh, objective: str | None = None, rules=None, pad_id: int = 2) -> Steps:
    """Builds the model and the jit-compiled init/train/eval functions with explicit shardings.

    ``objective`` defaults to ``config.train.objective``; ``rules`` are the logical-axis rules
    (default: those of the config's sharding preset); ``pad_id`` is the tokenizer's pad (= EOS)
    id, which the copy objectives write. In training the model gets a 'noise' RNG
    (``fold_in(seed, step)``) for noise-injection QAT; evaluation is deterministic.
    """
    if rules is None:
        rules = sharding.resolve(config)[1]
    act_rules = sharding.activation_rules(rules, mesh, activation_dims(config.model))
    model = build_model(config.model)
    tx = make_optimizer(config.train)
    ctx = objectives.ObjectiveContext(model=config.model, train=config.train, pad_id=int(pad_id))
    loss_fn = objectives.build(objective or config.train.objective, ctx)
    n_in = input_length(config.model)
    noise_key = jax.random.fold_in(jax.random.key(int(config.seed)), 0x5EED)
    accum = int(config.train.grad_accum)
    schedule = lr_schedule(config.train)

    per_row = config.train.batch_size // accum
    if per_row % sharding.batch_divisor(mesh):
        raise UserError(
            f"train.batch_size/grad_accum={per_row} must divide by the data-parallel size "
            f"{sharding.batch_divisor(mesh)} of mesh {dict(mesh.shape)}"
        )

    def init_boxed(rng):
        params = model.init(rng, jnp.zeros((1, n_in), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = sharding.tree_shardings(abstract_boxed, mesh, rules)
    abstract_state = ckpt_lib.abstract_like(nn.meta.unbox(abstract_boxed), state_shardings)
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def apply_fn(params, tokens, rngs=None):
        with sharding.activation_context(mesh, act_rules):
            return model.apply({"params": params}, tokens, rngs=rngs)

    def init(rng):
        with sharding.activation_context(mesh, act_rules):
            return nn.meta.unbox(init_boxed(rng))

    def train_step(state: TrainState, batch):
        rngs = {"noise": jax.random.fold_in(noise_key, state.step)}
        train_apply = functools.partial(apply_fn, rngs=rngs)
        grad_fn = jax.value_and_grad(lambda p, b: loss_fn(train_apply, p, b), has_aux=True)
        if accum == 1:
            (loss, sums), grads = grad_fn(state.params, batch)
        else:
            # Micro-batch k takes rows k, k+A, k+2A, ... so each stays spread over the batch axes.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch
            )

            def body(carry, mb):
                (l, s), g = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (l, s, g)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, state.params, first)
            (l0, s0), g0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            zero_carry = (l0, s0, g0)
            (loss, sums, grads), _ = jax.lax.scan(body, zero_carry, micro)
            # REFERENCE §1: the optimized loss is the mean of the micro-batches' token means.
            loss = loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = dict(sums, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
        return TrainState(state.step + 1, params, opt_state), stats

    def eval_step(params, batch):
        return loss_fn(apply_fn, params, batch)[1]

    return Steps(
        model=model,
        mesh=mesh,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        init=jax.jit(init, out_shardings=state_shardings),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_sh),
            out_shardings=(state_shardings, repl),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            eval_step, in_shardings=(state_shardings.params, batch_sh), out_shardings=repl
        ),
    )


def evaluate(steps: Steps, params, eval_batches: list[dict]) -> dict[str, float]:
    total = None
    for local in eval_batches:
        total = metrics_lib.add_sums(total, steps.eval_step(params, sharding.global_batch(local, steps.mesh)))
    if total is None:
        raise UserError("no evaluation batches: the validation split is too small")
    return metrics_lib.summarize(total)


# --------------------------------------------------------------------------- workdir


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_workdir_compatible(config, workdir: str) -> bool:
    """True when ``workdir`` holds an earlier run of this model; raises if it holds another model."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    # A field added to the schema after the workdir was made counts as its default value.
    from mixers_jax.config import base_config

    old = _flatten(dict(base_config().model.to_dict(), **saved.get("model", {})), "model.")
    new = _flatten(config.model.to_dict(), "model.")
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k}={old.get(k)!r} (saved) vs {new.get(k)!r}" for k in diff[:3])
        raise UserError(
            f"workdir {workdir} holds a different model ({shown}); use another --workdir"
        )
    return True


def _digest(batch: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(batch):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()


def _write_json_atomic(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


class _Log:
    """Progress lines to stdout (process 0 only) and to ``workdir/log.txt``."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self._file = open(os.path.join(workdir, "log.txt"), "a", encoding="utf-8") if enabled else None

    def __call__(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)
            self._file.write(line + "\n")
            self._file.flush()

    def close(self):
        if self._file:
            self._file.close()


# --------------------------------------------------------------------------- the loop


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at_step: int | None = None,
    record_batches: bool = False,
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary.

    ``stop_at_step`` behaves like a preemption at that step (save, then return), for tests and
    for splitting a run; ``record_batches`` adds a digest of every consumed batch to the summary.
    """
    from mixers_jax.data import pipeline  # models never import data; the trainer may

    validate(config)
    workdir = os.path.abspath(workdir)
    resuming = check_workdir_compatible(config, workdir)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0

    mesh_sizes, rules = sharding.resolve(config)
    mesh = sharding.make_mesh(mesh_sizes)
    steps = build_steps(config, mesh, rules=rules)  # validates the model config before anything is written

    data = pipeline.build_data(
        config,
        tokenizer_path=os.path.join(workdir, TOKENIZER_FILE),
        process_index=process_index,
        process_count=process_count,
    )
    # Nothing is written to the workdir before this point (build_data writes the tokenizer only
    # after its own checks passed).
    os.makedirs(workdir, exist_ok=True)
    if is_main and not resuming:
        _write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())

    log = _Log(workdir, is_main)
    writer = metrics_lib.Writer(os.path.join(workdir, "tb"), enabled=is_main)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(workdir, "checkpoints"), keep=int(config.train.keep_checkpoints)
    )
    meta = {"config": config.to_dict(), "tokenizer": ckpt_lib.encode_bytes(data.tokenizer.serialized())}
    try:
        return _loop(config, workdir, steps, data, checkpointer, writer, log, meta,
                     stop_at_step=stop_at_step, record_batches=record_batches)
    finally:
        checkpointer.close()
        writer.close()
        log.close()


def _loop(config, workdir, steps: Steps, data, checkpointer, writer, log, meta, *,
          stop_at_step, record_batches) -> dict:
    from mixers_jax.data import pipeline

    t_cfg = config.train
    total_steps = int(t_cfg.steps)
    tokens_per_step = int(t_cfg.batch_size) * input_length(config.model)
    flops_per_token = flops_lib.flops_per_token(config.model, training=True)
    peak = flops_lib.peak_flops_per_second(jax.devices()[0])
    peak_total = peak * jax.device_count() if peak else None

    latest = checkpointer.latest_step()
    if latest is not None:
        state, data_state, _ = checkpointer.restore(latest, steps.abstract_state)
        pipeline.set_iterator_state(data.train_iter, data_state)
        log(f"resumed from {checkpointer.directory} at step {latest}")
    else:
        state = steps.init(jax.random.key(int(config.seed)))
        log(
            f"training {config.name}: {config.model.kind}, "
            f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M params, "
            f"{total_steps} steps x {tokens_per_step} tokens, mesh {dict(steps.mesh.shape)}; "
            f"workdir {workdir}"
        )
    start_step = int(jax.device_get(state.step))
    last_saved = latest

    def save(step: int):
        nonlocal last_saved
        if last_saved == step:
            return
        checkpointer.save(step, state, pipeline.get_iterator_state(data.train_iter), dict(meta, step=step))
        last_saved = step

    summary: dict[str, Any] = {
        "workdir": workdir, "start_step": start_step, "batch_digests": [],
        "is_main": jax.process_index() == 0,
    }
    pending: list[tuple[int, dict]] = []  # device-side stats not yet checked on the host
    window_start, window_steps, compile_s = time.time(), 0, None

    def flush_pending():
        """Pulls pending stats to the host; raises on the first non-finite loss."""
        nonlocal pending
        host = jax.device_get([s for _, s in pending])
        for (step, _), stats in zip(pending, host):
            if not math.isfinite(float(stats["loss"])):
                pending = []
                where = f"step {last_saved} in {checkpointer.directory}" if last_saved is not None else "none"
                raise UserError(
                    f"non-finite loss {float(stats['loss'])} at step {step}; stopped. "
                    f"Last good checkpoint: {where}"
                )
        out = [(step, stats) for (step, _), stats in zip(pending, host)]
        pending = []
        return out

    window = profile_window(config)
    tracing = False

    with ckpt_lib.PreemptionGuard() as guard:
        step = start_step
        while step < total_steps:
            if window and step == window[0] and not tracing:
                trace_dir = os.path.join(workdir, "profile")
                jax.profiler.start_trace(trace_dir)
                tracing = True
                log(f"profiling steps {window[0]}..{window[1] - 1} into {trace_dir}")
            local = next(data.train_iter)
            if record_batches:
                summary["batch_digests"].append((step, _digest(local)))
            t0 = time.time()
            state, stats = steps.train_step(state, sharding.global_batch(local, steps.mesh))
            step += 1
            pending.append((step, stats))
            if tracing and (step >= window[1] or step == total_steps):
                jax.block_until_ready(stats["loss"])
                jax.profiler.stop_trace()
                tracing = False
            if compile_s is None:
                jax.block_until_ready(stats["loss"])
                compile_s = time.time() - t0
                window_start, window_steps = time.time(), 0
            else:
                window_steps += 1

            stop = stop_at_step is not None and step >= stop_at_step
            if step % t_cfg.log_every == 0 or step == total_steps or guard.requested or stop:
                checked = flush_pending()
                _, last = checked[-1]
                elapsed = time.time() - window_start
                step_s = elapsed / window_steps if window_steps else float("nan")
                tok_s = tokens_per_step / step_s if window_steps else float("nan")
                eta = (total_steps - step) * step_s
                train_metrics = metrics_lib.summarize(last)
                scalars = {
                    "train/loss": float(last["loss"]),
                    "train/accuracy": train_metrics["accuracy"],
                    "train/bpb": train_metrics["bpb"],
                    "train/grad_norm": float(last["grad_norm"]),
                    "train/lr": float(last["lr"]),
                }
                if window_steps:
                    scalars.update({"perf/tokens_per_s": tok_s, "perf/step_s": step_s})
                    if peak_total:
                        scalars["perf/mfu"] = flops_lib.mfu(flops_per_token, tok_s, peak_total)
                writer.scalars(step, scalars)
                log(
                    f"step {step:>6}/{total_steps} | loss {float(last['loss']):.4f} | "
                    f"lr {float(last['lr']):.2e} | {tok_s / 1e3:.1f}k tok/s | "
                    f"{step_s:.3f} s/step | ETA {metrics_lib.format_duration(eta)}"
                )
                window_start, window_steps = time.time(), 0

            if step % t_cfg.eval_every == 0 or step == total_steps:
                flush_pending()
                ev = evaluate(steps, state.params, data.eval_batches)
                writer.scalars(step, {f"eval/{k}": ev[k] for k in ("loss", "accuracy", "bpb")})
                log(f"eval @ {step}: loss {ev['loss']:.4f} | accuracy {ev['accuracy']:.4f} | "
                    f"bits/byte {ev['bpb']:.4f}")
                summary["eval"] = ev
                window_start, window_steps = time.time(), 0

            if step % t_cfg.checkpoint_every == 0 or step == total_steps or guard.requested or stop:
                flush_pending()
                save(step)
                window_start, window_steps = time.time(), 0
            if guard.requested or stop:
                if tracing:
                    jax.profiler.stop_trace()
                why = guard.requested or f"stop_at_step={stop_at_step}"
                log(f"{why}: saved step {step} in {checkpointer.directory}; exiting")
                summary.update(preempted=True, final_step=step)
                return summary

    summary.update(
        preempted=False,
        final_step=step,
        compile_s=compile_s,
        flops_per_token=flops_per_token,
        data=data.stats,
    )
    if "eval" not in summary:
        summary["eval"] = evaluate(steps, state.params, data.eval_batches)
    baselines = metrics_lib.compressor_bpb(metrics_lib.batches_text(data.eval_batches, data.tokenizer))
    summary["compressors"] = baselines
    log("eval text, bits/byte: model {:.4f} | {}".format(
        summary["eval"]["bpb"], " | ".join(f"{k} {v:.4f}" for k, v in baselines.items())))
    summary["params"] = state.params if step == total_steps else None
    if jax.process_index() == 0:
        _write_json_atomic(
            os.path.join(workdir, RESULTS_FILE),
            {k: v for k, v in summary.items() if k not in ("params", "batch_digests")},
        )
    return summary


def load_config_file(workdir: str) -> dict:
    with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def die(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)
