"""Everything compiled for one (model, optimizer, mesh): the train state, the optimizer and its
schedule, the jit-compiled init / train / eval steps, and the evaluation over a list of batches.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax import metrics as metrics_lib
from mixers_jax import objectives, sharding
from mixers_jax.curriculum import FROZEN, TRAINABLE, eval_objective_names, param_labels
from mixers_jax.errors import UserError
from mixers_jax.config import sub_model_config as sub_config
from mixers_jax.models import build_model, example_input
from mixers_jax.models.specs import DROPOUTS as DROPOUT_FIELDS


# --------------------------------------------------------------------------- optimizer


def lr_schedule(train_cfg, offset: int = 0) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0, then linear (or cosine) decay to exactly 0 at the final step.

    lr(t) = η·t/w for t < w and η·(T−t)/(T−w) afterwards, so the first update uses lr 0.
    ``offset`` is the first global step of a curriculum stage: this is the schedule of a global
    step (t counts from there), used for the logged lr. The optimizer evaluates it at offset 0 on
    its own update count, which restarts at 0 with each stage's fresh state (:func:`make_optimizer`).
    """
    peak, warmup, total = float(train_cfg.lr), int(train_cfg.warmup_steps), int(train_cfg.steps)
    warmup = min(warmup, total)

    def schedule(step):
        t = jnp.asarray(step, jnp.float32) - offset
        warm = peak * t / max(warmup, 1)
        frac = jnp.clip((t - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if train_cfg.schedule == "cosine":
            decay = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        else:
            decay = peak * (1.0 - frac)
        return jnp.where(t < warmup, warm, decay)

    return schedule


def make_optimizer(train_cfg, labels: Any = None) -> optax.GradientTransformation:
    """AdamW (weight decay 0 by default, i.e. Adam) after global-norm clipping (docs/training.md#optimizer).

    The lr schedule is evaluated on the optimizer's own update count, which starts at 0 with
    ``tx.init``: a curriculum stage's fresh optimizer state is at t = 0 of the stage's schedule
    whatever its first global step (shifting it by that step as well gives t < 0: a negative lr).

    ``labels`` (a tree like the params of 'train' / 'frozen', see :func:`param_labels`): frozen
    parameters get exactly zero updates and are left out of the clipping norm and the moments.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(float(train_cfg.clip_norm)),
        optax.adamw(
            lr_schedule(train_cfg),
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay),
        ),
    )
    if labels is None or FROZEN not in jax.tree.leaves(labels):
        return tx
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- fp16 loss scaling

LOSS_SCALE_INIT = 2.0 ** 15  # the first loss scale of a float16 run
LOSS_SCALE_GROWTH_STEPS = 2000  # finite steps in a row after which the scale doubles
MAX_CONSECUTIVE_SKIPS = 10  # the trainer calls a run diverged after this many skips in a row


class LossScaleState(NamedTuple):
    scale: jax.Array  # float32 scalar S: the loss is multiplied by S before differentiation
    good_steps: jax.Array  # finite steps since the scale last changed
    inner: Any  # optax.apply_if_finite's state (skip counters) around the optimizer's state


def dynamic_loss_scale(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Dynamic loss scaling around ``tx`` (for float16 compute; docs/training.md#precision).

    ``update`` takes the gradients of S·loss, divides them by S, and hands them to
    ``optax.apply_if_finite(tx)``, which applies a zero update (params and ``tx``'s state
    unchanged) when any gradient is NaN/inf and counts the skip (``notfinite_count`` in a row,
    ``total_notfinite`` overall). S halves on a skipped step (never below 1) and doubles after
    ``LOSS_SCALE_GROWTH_STEPS`` finite steps in a row. The state lives in the optimizer state, so
    checkpoints keep it and a resumed run continues with the same scale.
    """
    # The trainer stops after MAX_CONSECUTIVE_SKIPS, so apply_if_finite must never let a
    # non-finite update through on its own.
    skipping = optax.apply_if_finite(tx, max_consecutive_errors=2 ** 30)

    def init(params):
        return LossScaleState(jnp.asarray(LOSS_SCALE_INIT, jnp.float32), jnp.zeros((), jnp.int32),
                              skipping.init(params))

    def update(scaled_grads, state, params=None):
        grads = jax.tree.map(lambda g: g / state.scale.astype(g.dtype), scaled_grads)
        updates, inner = skipping.update(grads, state.inner, params)
        finite = inner.last_finite
        good = jnp.where(finite, state.good_steps + 1, 0)
        grow = good >= LOSS_SCALE_GROWTH_STEPS
        scale = jnp.where(finite, jnp.where(grow, state.scale * 2.0, state.scale),
                          jnp.maximum(state.scale * 0.5, 1.0))
        return updates, LossScaleState(scale, jnp.where(grow, 0, good), inner)

    return optax.GradientTransformation(init, update)


def loss_scale_stats(opt_state: LossScaleState) -> dict:
    """The train stats of a loss-scaled step: the scale for the next step, whether this step was
    skipped, skips in a row and in total."""
    inner = opt_state.inner
    return {"loss_scale": opt_state.scale, "skipped": jnp.logical_not(inner.last_finite),
            "consecutive_skips": inner.notfinite_count, "skipped_steps": inner.total_notfinite}


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
    eval_steps: dict[str, Callable[[Any, dict], dict]] = dataclasses.field(default_factory=dict)
    fresh_state: Callable[[Any, jax.Array], TrainState] | None = None
    config: Any = None


def activation_dims(model_cfg) -> dict[str, int]:
    """Sizes of the activation axes the models constrain (to replicate what a mesh cannot split).

    A composite model (encoder and decoder with their own widths and heads) gets the gcd over its
    parts, so an axis is split only where the mesh divides it in every part."""
    def dims(cfg) -> tuple[int, int]:
        heads = cfg["heads"] if cfg["kind"] == "mixer" else cfg["n_heads"]
        return int(heads or 1), int(cfg["mlp_ratio"] * cfg["d_model"])

    parts = [model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)]
    if parts[0]["kind"] == "matcher":  # a mixer over embeddings
        parts[0]["kind"] = "mixer"
    if parts[0]["kind"] not in ("mixer", "transformer"):
        parts = [sub_config(model_cfg, role) for role in ("encoder", "decoder")]
    heads, mlp = zip(*(dims(cfg) for cfg in parts))
    return {"act_heads": math.gcd(*heads), "act_mlp": math.gcd(*mlp)}


def build_steps(config, mesh, objective: str | None = None, rules=None, pad_id: int = 2,
                offset: int = 0) -> Steps:
    """Builds the model and the jit-compiled init/train/eval functions with explicit shardings.

    ``objective`` defaults to ``config.train.objective``; ``rules`` are the logical-axis rules
    (default: those of the config's sharding preset); ``pad_id`` is the tokenizer's pad (= EOS)
    id, which the copy objectives write. In training the model gets a 'noise' RNG
    (``fold_in(seed, step)``) for noise-injection QAT; evaluation is deterministic. ``offset`` is
    the first step of the curriculum stage ``config.train`` describes (for the logged lr; the
    optimizer counts from the stage's fresh state, see make_optimizer); ``train.frozen`` groups
    get zero updates. ``eval_steps`` holds one eval function per name in
    ``train.eval_objectives`` (default: the training objective).
    """
    if rules is None:
        rules = sharding.resolve(config)[1]
    act_rules = sharding.activation_rules(rules, mesh, activation_dims(config.model))
    model = build_model(config.model, remat=config.train.get("remat", "none"))
    ctx = objectives.context(config, pad_id=int(pad_id))
    loss_fn = objectives.build(objective or config.train.objective, ctx)
    eval_fns = {name: objectives.build(name, ctx) for name in eval_objective_names(config.train)}
    noise_key = jax.random.fold_in(jax.random.key(int(config.seed)), 0x5EED)
    dropout_key = jax.random.fold_in(jax.random.key(int(config.seed)), 0xD209)
    accum = int(config.train.grad_accum)
    schedule = lr_schedule(config.train, offset)

    per_row = config.train.batch_size // accum
    if per_row % sharding.batch_divisor(mesh):
        raise UserError(
            f"train.batch_size/grad_accum={per_row} must divide by the data-parallel size "
            f"{sharding.batch_divisor(mesh)} of mesh {dict(mesh.shape)}"
        )

    def init_params(rng):
        return model.init(rng, example_input(config.model))["params"]

    labels = param_labels(nn.meta.unbox(jax.eval_shape(init_params, jax.random.key(0))), config.train)
    tx = make_optimizer(config.train, labels)
    loss_scaled = config.model.dtype == "float16"
    if loss_scaled:
        tx = dynamic_loss_scale(tx)
    dropout_on = any(float(config.model.get(k, 0.0)) for k in DROPOUT_FIELDS)
    frozen_any = FROZEN in jax.tree.leaves(labels)

    def init_boxed(rng):
        params = init_params(rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    state_shardings = sharding.tree_shardings(abstract_boxed, mesh, rules)
    abstract_state = ckpt_lib.abstract_like(nn.meta.unbox(abstract_boxed), state_shardings)
    batch_sh = sharding.batch_sharding(mesh)
    repl = sharding.replicated(mesh)

    def apply_fn(params, *args, rngs=None, method=None, **inputs):
        """The model's forward on ``args`` (tokens) and keyword ``inputs``, or its ``method``
        (objectives that read a model's parts, e.g. its memory), under the activation sharding
        rules."""
        with sharding.activation_context(mesh, act_rules):
            return model.apply({"params": params}, *args, rngs=rngs, method=method, **inputs)

    def init(rng):
        with sharding.activation_context(mesh, act_rules):
            return nn.meta.unbox(init_boxed(rng))

    def fresh_state(params, step):
        """A new optimizer state for ``params`` at ``step`` (a stage's start, or after init_from)."""
        return TrainState(step=step, params=params, opt_state=tx.init(params))

    def train_step(state: TrainState, batch):
        rngs = {"noise": jax.random.fold_in(noise_key, state.step)}
        if dropout_on:  # no 'dropout' stream at all when every rate is 0
            rngs["dropout"] = jax.random.fold_in(dropout_key, state.step)
        train_apply = functools.partial(apply_fn, rngs=rngs)
        if loss_scaled:  # differentiate S·loss, report the loss (the scale is undone in tx)
            def scaled_loss(p, b):
                loss, sums = loss_fn(train_apply, p, b)
                return loss * state.opt_state.scale, (loss, sums)

            scaled_grad = jax.grad(scaled_loss, has_aux=True)

            def grad_fn(p, b):
                grads, (loss, sums) = scaled_grad(p, b)
                return (loss, sums), grads
        else:
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
            # docs/training.md#gradient-accumulation: the optimized loss is the mean of the
            # micro-batches' token means.
            loss = loss / accum
            grads = jax.tree.map(lambda g: g / accum, grads)
        if frozen_any:  # constant zeros: XLA drops the frozen groups' weight gradients
            grads = jax.tree.map(
                lambda g, lab: jnp.zeros_like(g) if lab == FROZEN else g, grads, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # ``finite``: the state after the update (what a checkpoint of this step would hold) has no
        # NaN or infinity; one on-device bool, read by the loop with the loss.
        # grad_norm: of the gradients of the (unscaled) loss; under loss scaling tx unscales them
        grad_norm = optax.tree.norm(grads) / state.opt_state.scale if loss_scaled else optax.tree.norm(grads)
        stats = dict(sums, loss=loss, grad_norm=grad_norm, lr=schedule(state.step),
                     finite=ckpt_lib.all_finite((params, opt_state)))
        if loss_scaled:
            stats.update(loss_scale_stats(opt_state))
        return TrainState(state.step + 1, params, opt_state), stats

    def eval_step(params, batch):
        return loss_fn(apply_fn, params, batch)[1]

    def jit_eval(fn):
        return jax.jit(lambda p, b: fn(apply_fn, p, b)[1],
                       in_shardings=(state_shardings.params, batch_sh), out_shardings=repl)

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
        eval_steps={name: jit_eval(fn) for name, fn in eval_fns.items()},
        fresh_state=jax.jit(fresh_state, in_shardings=(state_shardings.params, repl),
                            out_shardings=state_shardings),
        config=config,
    )


def eval_sums(steps: Steps, params, eval_batches: list[dict], eval_step=None) -> tuple[dict, int]:
    """(the sums of ``eval_step`` (default: the training objective's) over ``eval_batches``, the
    number of rows over all processes)."""
    eval_step = eval_step or steps.eval_step
    total, rows = None, 0
    for local in eval_batches:
        total = metrics_lib.add_sums(total, eval_step(params, sharding.global_batch(local, steps.mesh)))
        rows += int(next(iter(local.values())).shape[0]) * jax.process_count()
    if total is None:
        raise UserError("no evaluation batches: the validation split is too small")
    return total, rows


def evaluate(steps: Steps, params, eval_batches: list[dict], eval_step=None) -> dict[str, float]:
    """Token-weighted loss, accuracy and bits per byte of ``eval_step`` (default: the training
    objective's) over ``eval_batches``; extra sums (e.g. the copy pass of 'combined') are
    summarised under their prefix (``copy_accuracy``, ...)."""
    total, rows = eval_sums(steps, params, eval_batches, eval_step)
    out = metrics_lib.summarize_sums(total)
    if steps.config is not None:
        out.update(metrics_lib.accounting(steps.config.model, total, rows))
    return out


def evaluate_all(steps: Steps, params, eval_batches: list[dict]) -> dict[str, dict[str, float]]:
    """{objective name: evaluate(...)} for every eval objective of ``steps``."""
    return {name: evaluate(steps, params, eval_batches, fn) for name, fn in steps.eval_steps.items()}
