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
from mixers_jax import objectives, sharding, target_bytes
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic
from mixers_jax.models import build_model, input_length

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
RESULTS_FILE = "results.json"


# --------------------------------------------------------------------------- optimizer


def lr_schedule(train_cfg, offset: int = 0) -> Callable[[jax.Array], jax.Array]:
    """Linear warmup from 0, then linear (or cosine) decay to exactly 0 at the final step.

    REFERENCE §1: lr(t) = η·t/w for t < w and η·(T−t)/(T−w) afterwards, so the first update uses lr 0.
    ``offset`` is the first global step of a curriculum stage (t counts from there).
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


def make_optimizer(train_cfg, offset: int = 0, labels: Any = None) -> optax.GradientTransformation:
    """AdamW (weight decay 0 by default, i.e. Adam) after global-norm clipping (REFERENCE §1).

    ``labels`` (a tree like the params of 'train' / 'frozen', see :func:`param_labels`): frozen
    parameters get exactly zero updates and are left out of the clipping norm and the moments.
    """
    tx = optax.chain(
        optax.clip_by_global_norm(float(train_cfg.clip_norm)),
        optax.adamw(
            lr_schedule(train_cfg, offset),
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay),
        ),
    )
    if labels is None or FROZEN not in jax.tree.leaves(labels):
        return tx
    return optax.multi_transform({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


# --------------------------------------------------------------------------- stages and freezing

TRAINABLE, FROZEN = "train", "frozen"
STAGE_KEYS = ("name", "objective", "steps", "frozen", "init_from", "init_map", "lr", "warmup_steps",
              "schedule", "frozen_encoder_embedding", "copy_pass", "eval_objectives")
EMBEDDING_CHOICES = ("fresh_trainable", "pretrained_frozen", "pretrained_trainable")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One curriculum stage: global steps [start, end) trained with ``train`` (config.train with the
    stage's overrides; ``train.steps`` is the stage's length)."""

    index: int
    name: str
    start: int
    end: int
    train: Any


def _csv(text) -> tuple[str, ...]:
    """Names from a comma string or a sequence of them (``--config.train.eval_objectives=clm,copy``
    arrives as the one-element tuple ('clm,copy',))."""
    items = text if isinstance(text, (list, tuple)) else (text,)
    return tuple(t.strip() for item in items for t in str(item or "").split(",") if t.strip())


def stages(config) -> list[Stage]:
    """The run's stages: ``train.stages`` (a curriculum), or one stage made of ``train.*``.

    With stages, ``train.steps`` is ignored: the run lasts the sum of the stages' steps. Each stage
    restarts the optimizer (fresh moments, its own warmup and decay to 0) and keeps the parameters.
    """
    specs = [dict(s) for s in config.train.stages] or [{}]
    out, start = [], 0
    for i, spec in enumerate(specs):
        unknown = sorted(set(spec) - set(STAGE_KEYS))
        if unknown:
            raise UserError(f"train.stages[{i}] has unknown key(s) {unknown}; allowed: {list(STAGE_KEYS)}")
        t = ml_collections.ConfigDict(config.train.to_dict())
        t.stages = ()
        for key, value in spec.items():
            if key != "name":
                t[key] = type(t[key])(value) if isinstance(t[key], (int, float)) and not isinstance(
                    t[key], bool) else value
        steps = int(t.steps)
        if steps <= 0:
            raise UserError(f"train.stages[{i}].steps must be positive, got {steps}")
        name = str(spec.get("name") or (t.objective if config.train.stages else "train"))
        out.append(Stage(i, name, start, start + steps, t))
        start += steps
    return out


def total_steps(config) -> int:
    return stages(config)[-1].end


def stage_at(stage_list: list[Stage], step: int) -> Stage:
    """The stage that produced a checkpoint at ``step`` (step 0: the first)."""
    for st in stage_list:
        if st.start < step <= st.end:
            return st
    return stage_list[0]


def stage_config(config, stage: Stage):
    """``config`` with ``train`` replaced by the stage's (for build_steps)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train = ml_collections.ConfigDict(stage.train.to_dict())
    return c


def eval_objective_names(train_cfg) -> tuple[str, ...]:
    return _csv(train_cfg.eval_objectives) or (str(train_cfg.objective),)


def param_labels(params: Any, train_cfg) -> Any:
    """'frozen' for every leaf under a top-level group named in ``train.frozen``, else 'train'.

    With ``frozen_encoder_embedding`` 'fresh_trainable' (REFERENCE §4 default) or
    'pretrained_trainable', a frozen group's own token embedding (its ``embed`` child) stays trainable.
    """
    frozen = set(_csv(train_cfg.frozen))
    unknown = sorted(frozen - set(params))
    if unknown:
        raise UserError(
            f"train.frozen names {unknown}, which the model does not have; its parameter groups are "
            f"{sorted(params)}"
        )
    embedding = str(train_cfg.frozen_encoder_embedding)
    if embedding not in EMBEDDING_CHOICES:
        raise UserError(f"train.frozen_encoder_embedding must be one of {EMBEDDING_CHOICES}, got {embedding!r}")

    def label(path, _):
        keys = [getattr(k, "key", str(k)) for k in path]
        if keys[0] not in frozen:
            return TRAINABLE
        if len(keys) > 1 and keys[1] == "embed" and embedding != "pretrained_frozen":
            return TRAINABLE
        return FROZEN

    return jax.tree_util.tree_map_with_path(label, params)


def _subtree(tree: Any, path: str, what: str) -> Any:
    node = tree
    if path in (".", ""):
        return node
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise UserError(f"{what} has no parameter group {path!r} (it has {sorted(node)})")
        node = node[key]
    return node


def _init_map(stage: Stage, source_params: Any) -> list[tuple[str, str]]:
    pairs = _csv(stage.train.init_map)
    if not pairs:  # a trained model's encoder, or a whole causal LM, into our encoder
        return [("encoder", "encoder" if "encoder" in source_params else ".")]
    out = []
    for pair in pairs:
        target, sep, source = pair.partition("=")
        if not sep or not target.strip():
            raise UserError(f"train.init_map entries look like 'target=source', got {pair!r}")
        out.append((target.strip(), source.strip() or "."))
    return out


def merge_init_params(params: Any, source_params: Any, stage: Stage, source_name: str) -> Any:
    """``params`` with the subtrees of ``train.init_map`` copied from ``source_params``.

    Every leaf of a target subtree must exist in the source with the same shape (extra source
    leaves, e.g. a causal LM's head, are ignored). A frozen group's ``embed`` is not copied under
    ``frozen_encoder_embedding='fresh_trainable'`` (REFERENCE §4: a new N(0,1) embedding).
    """
    frozen = set(_csv(stage.train.frozen))
    fresh = str(stage.train.frozen_encoder_embedding) == "fresh_trainable"
    out = jax.tree.map(lambda x: x, params)
    for target, source in _init_map(stage, source_params):
        skip = f"{target}/embed" if fresh and target.split("/")[0] in frozen else None
        _copy_leaves(_subtree(out, target, "this model"),
                     _subtree(source_params, source, f"the checkpoint in {source_name}"),
                     target, skip, f"{source_name} ({source})")
    return out


def _copy_leaves(tgt_node: dict, src_node: dict, prefix: str, skip: str | None, source: str) -> None:
    """Copies every leaf of ``tgt_node`` from ``src_node`` in place, checking shapes."""
    for key in list(tgt_node):
        where = f"{prefix}/{key}"
        if where == skip:
            continue
        if key not in src_node:
            raise UserError(f"init_from {source} has no {key!r} for {where}: the models differ in "
                            "structure (depth, mixing or kind)")
        if isinstance(tgt_node[key], dict):
            _copy_leaves(tgt_node[key], src_node[key], where, skip, source)
        else:
            a, b = _shape(tgt_node[key]), _shape(src_node[key])
            if a != b:
                raise UserError(f"init_from {source}: {where} has shape {a} here but {b} there "
                                "(a different width, context or vocabulary)")
            value = src_node[key]
            tgt_node[key] = value if isinstance(value, jax.ShapeDtypeStruct) else np.asarray(value)


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _source_params(stage: Stage, abstract: bool = False):
    """Params (or their shapes) of the latest checkpoint in ``stage.train.init_from``."""
    from mixers_jax import workdir as workdir_lib

    path = os.path.abspath(str(stage.train.init_from))
    if abstract:
        cfg = workdir_lib.load_config(path)
        model = build_model(cfg.model)
        shapes = jax.eval_shape(
            lambda r: model.init(r, jnp.zeros((1, input_length(cfg.model)), jnp.int32))["params"],
            jax.random.key(0))
        return nn.meta.unbox(shapes), cfg
    run = workdir_lib.load_run(path)
    return jax.device_get(run.params), run.config


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
    labels: Any = None
    config: Any = None


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
    """Sizes of the activation axes the models constrain (to replicate what a mesh cannot split).

    A composite model (encoder and decoder with their own widths and heads) gets the gcd over its
    parts, so an axis is split only where the mesh divides it in every part."""
    from mixers_jax.models import sub_config

    def dims(cfg) -> tuple[int, int]:
        heads = cfg["heads"] if cfg["kind"] == "mixer" else cfg["n_heads"]
        return int(heads or 1), int(cfg["mlp_ratio"] * cfg["d_model"])

    parts = [model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)]
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
    the first step of the curriculum stage ``config.train`` describes (for the lr schedule);
    ``train.frozen`` groups get zero updates. ``eval_steps`` holds one eval function per name in
    ``train.eval_objectives`` (default: the training objective).
    """
    if rules is None:
        rules = sharding.resolve(config)[1]
    act_rules = sharding.activation_rules(rules, mesh, activation_dims(config.model))
    model = build_model(config.model)
    ctx = objectives.ObjectiveContext(model=config.model, train=config.train, pad_id=int(pad_id))
    loss_fn = objectives.build(objective or config.train.objective, ctx)
    eval_fns = {name: objectives.build(name, ctx) for name in eval_objective_names(config.train)}
    n_in = input_length(config.model)
    noise_key = jax.random.fold_in(jax.random.key(int(config.seed)), 0x5EED)
    accum = int(config.train.grad_accum)
    schedule = lr_schedule(config.train, offset)

    per_row = config.train.batch_size // accum
    if per_row % sharding.batch_divisor(mesh):
        raise UserError(
            f"train.batch_size/grad_accum={per_row} must divide by the data-parallel size "
            f"{sharding.batch_divisor(mesh)} of mesh {dict(mesh.shape)}"
        )

    def init_params(rng):
        return model.init(rng, jnp.zeros((1, n_in), jnp.int32))["params"]

    labels = param_labels(nn.meta.unbox(jax.eval_shape(init_params, jax.random.key(0))), config.train)
    tx = make_optimizer(config.train, offset, labels)
    frozen_any = FROZEN in jax.tree.leaves(labels)

    def init_boxed(rng):
        params = init_params(rng)
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

    def fresh_state(params, step):
        """A new optimizer state for ``params`` at ``step`` (a stage's start, or after init_from)."""
        return TrainState(step=step, params=params, opt_state=tx.init(params))

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
        if frozen_any:  # constant zeros: XLA drops the frozen groups' weight gradients
            grads = jax.tree.map(
                lambda g, lab: jnp.zeros_like(g) if lab == FROZEN else g, grads, labels)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats = dict(sums, loss=loss, grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
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
        labels=labels,
        config=config,
    )


def evaluate(steps: Steps, params, eval_batches: list[dict], eval_step=None) -> dict[str, float]:
    """Token-weighted loss, accuracy and bits per byte of ``eval_step`` (default: the training
    objective's) over ``eval_batches``; extra sums (e.g. the copy pass of 'combined') are
    summarised under their prefix (``copy_accuracy``, ...)."""
    eval_step = eval_step or steps.eval_step
    total, rows = None, 0
    for local in eval_batches:
        total = metrics_lib.add_sums(total, eval_step(params, sharding.global_batch(local, steps.mesh)))
        rows += int(local["tokens"].shape[0]) * jax.process_count()
    if total is None:
        raise UserError("no evaluation batches: the validation split is too small")
    out = summarize_sums(total)
    if steps.config is not None:
        out.update(accounting(steps.config.model, total, rows))
    return out


def accounting(model_cfg, sums, sequences: int) -> dict[str, float]:
    """REFERENCE §7 extras: for models that store one embedding per sequence, the loss offset,
    normalized loss, embedding and total bits per byte (at model.embed_bits bits per number); for
    autoencoders, the information ratio I_e = 1 − H/9.03 and 1 − H/ln V."""
    out = {}
    n_p = metrics_lib.stored_numbers(model_cfg)
    if n_p:
        acc = metrics_lib.embedding_accounting(sums, n_p, float(model_cfg.embed_bits), sequences)
        out.update({k: acc[k] for k in ("loss_offset", "normalized_loss", "embedding_bpb", "total_bpb")})
    if model_cfg.kind == "autoencoder":
        loss = float(sums["nll"]) / max(float(sums["tokens"]), 1.0)
        out["information_ratio"] = metrics_lib.information_ratio(loss)
        out["information_ratio_lnv"] = metrics_lib.information_ratio_exact(loss, int(model_cfg.vocab_size))
    return out


def summarize_sums(sums) -> dict[str, float]:
    """metrics.summarize of the plain sums, plus ``<prefix>_<metric>`` for prefixed sums."""
    keys = ("nll", "tokens", "correct", "bytes")
    out = metrics_lib.summarize({k: sums[k] for k in keys})
    prefixes = sorted({k[: -len(b) - 1] for k in sums for b in keys if k.endswith("_" + b)})
    for prefix in prefixes:
        if all(f"{prefix}_{b}" in sums for b in keys):
            sub = metrics_lib.summarize({b: sums[f"{prefix}_{b}"] for b in keys})
            out.update({f"{prefix}_{k}": v for k, v in sub.items()})
    return out


def evaluate_all(steps: Steps, params, eval_batches: list[dict]) -> dict[str, dict[str, float]]:
    """{objective name: evaluate(...)} for every eval objective of ``steps``."""
    return {name: evaluate(steps, params, eval_batches, fn) for name, fn in steps.eval_steps.items()}


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
    A curriculum (``train.stages``) runs every stage in turn; the checkpoint's step says which
    stage it belongs to, so a run killed mid-stage resumes mid-stage.
    """
    from mixers_jax.data import pipeline  # models never import data; the trainer may

    validate(config)
    stage_list = stages(config)
    workdir = os.path.abspath(workdir)
    resuming = check_workdir_compatible(config, workdir)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0

    mesh_sizes, rules = sharding.resolve(config)
    mesh = sharding.make_mesh(mesh_sizes)
    # Every stage's model, objectives, frozen groups and init_from source are checked before
    # anything is written.
    first = build_steps(stage_config(config, stage_list[0]), mesh, rules=rules)
    for st in stage_list:
        check_stage(config, st, first)
    config = _with_init_tokenizer(config, stage_list)

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
    runner = _Runner(config, workdir, mesh, rules, stage_list, data, pad_id=data.tokenizer.pad_id)
    try:
        return _loop(config, workdir, runner, data, checkpointer, writer, log, meta,
                     stop_at_step=stop_at_step, record_batches=record_batches)
    finally:
        checkpointer.close()
        writer.close()
        log.close()


def check_stage(config, stage: Stage, first: Steps) -> None:
    """Raises UserError for a stage that cannot run: its objectives, frozen groups, and the shapes
    of what it would load from ``init_from`` (compared without loading any array)."""
    ctx = objectives.ObjectiveContext(model=config.model, train=stage.train)
    for name in (str(stage.train.objective),) + eval_objective_names(stage.train):
        objectives.build(name, ctx)
    params = first.abstract_state.params
    param_labels(params, stage.train)
    if str(stage.train.init_from):
        path = os.path.abspath(str(stage.train.init_from))
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise UserError(f"train.init_from {path} is not a trained workdir (no checkpoints/)")
        source, source_cfg = _source_params(stage, abstract=True)
        if int(source_cfg.model.vocab_size) != int(config.model.vocab_size):
            raise UserError(
                f"train.init_from {path} has vocabulary {source_cfg.model.vocab_size}, this model "
                f"{config.model.vocab_size}")
        merge_init_params(params, source, stage, path)
    elif _csv(stage.train.init_map):
        raise UserError("train.init_map is set but train.init_from is empty")


def _with_init_tokenizer(config, stage_list: list[Stage]):
    """A run that loads trained parameters must read text with the same tokenizer: when
    ``data.tokenizer_model`` is empty, the first init_from workdir's tokenizer is used."""
    sources = [str(st.train.init_from) for st in stage_list if str(st.train.init_from)]
    if not sources or str(config.data.tokenizer_model):
        return config
    path = os.path.join(os.path.abspath(sources[0]), TOKENIZER_FILE)
    if not os.path.exists(path):
        raise UserError(f"train.init_from {sources[0]} has no {TOKENIZER_FILE}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.tokenizer_model = path
    c.lock()
    return c


class _Runner:
    """Builds (and caches) each stage's compiled steps and moves a state into a stage."""

    def __init__(self, config, workdir, mesh, rules, stage_list, data, pad_id):
        self.config, self.workdir, self.mesh, self.rules = config, workdir, mesh, rules
        self.stages, self.data, self.pad_id = stage_list, data, int(pad_id)
        self._built: dict[int, Steps] = {}

    def steps(self, stage: Stage) -> Steps:
        if stage.index not in self._built:
            self._built.clear()  # one stage's executables at a time
            self._built[stage.index] = build_steps(
                stage_config(self.config, stage), self.mesh, rules=self.rules, pad_id=self.pad_id,
                offset=stage.start)
        return self._built[stage.index]

    def enter(self, stage: Stage, params, step: int, log) -> TrainState:
        """The state at the start of ``stage``: ``params`` (with its init_from subtrees loaded) and
        a fresh optimizer."""
        steps = self.steps(stage)
        if str(stage.train.init_from):
            source, _ = _source_params(stage)
            host = merge_init_params(jax.device_get(params), source, stage, str(stage.train.init_from))
            params = jax.device_put(host, steps.state_shardings.params)
            log(f"stage {stage.name}: loaded {', '.join(f'{t}<-{s}' for t, s in _init_map(stage, source))} "
                f"from {os.path.abspath(str(stage.train.init_from))}")
        frozen = _csv(stage.train.frozen)
        if len(self.stages) > 1 or frozen:
            log(f"stage {stage.index + 1}/{len(self.stages)} '{stage.name}': {stage.train.objective}, "
                f"steps {stage.start}..{stage.end}" + (f", frozen: {', '.join(frozen)}" if frozen else ""))
        return steps.fresh_state(params, jnp.asarray(step, jnp.int32))


def _log_eval(writer, log, step: int, evals: dict[str, dict[str, float]]) -> None:
    """eval/loss, eval/accuracy, eval/bpb for the first objective; eval/<name>/... for all."""
    first = next(iter(evals))
    scalars = {f"eval/{k}": evals[first][k] for k in ("loss", "accuracy", "bpb")}
    for name, ev in evals.items():
        scalars.update({f"eval/{name}/{k}": v for k, v in ev.items() if k not in ("tokens", "bytes")})
    writer.scalars(step, scalars)
    for name, ev in evals.items():
        label = f"eval {name} @ {step}" if len(evals) > 1 else f"eval @ {step}"
        extra = "".join(f" | {k} {v:.4f}" for k, v in ev.items()
                        if k.endswith("accuracy") and k != "accuracy"
                        or k in ("normalized_loss", "total_bpb", "information_ratio"))
        log(f"{label}: loss {ev['loss']:.4f} | accuracy {ev['accuracy']:.4f} | "
            f"bits/byte {ev['bpb']:.4f}{extra}")


def results_table(evals: dict[str, dict[str, float]], compressors: dict[str, float]) -> str:
    """The final evaluation as a small text table (one row per objective) and the compressors."""
    extras = [k for k in ("copy_accuracy", "normalized_loss", "total_bpb", "information_ratio")
              if any(k in ev for ev in evals.values())]
    lines = [f"{'objective':<12} {'loss':>8} {'accuracy':>9} {'bits/byte':>10}"
             + "".join(f" {k:>17}" for k in extras)]
    for name, ev in evals.items():
        lines.append(f"{name:<12} {ev['loss']:>8.4f} {ev['accuracy']:>9.4f} {ev['bpb']:>10.4f}"
                     + "".join(f" {ev.get(k, float('nan')):>17.4f}" for k in extras))
    lines.append("same eval text, bits/byte: " + " | ".join(f"{k} {v:.4f}" for k, v in compressors.items()))
    return "\n".join(lines)


def _loop(config, workdir, runner: _Runner, data, checkpointer, writer, log, meta, *,
          stop_at_step, record_batches) -> dict:
    from mixers_jax.data import pipeline

    stage_list = runner.stages
    total = stage_list[-1].end
    tokens_per_step = int(config.train.batch_size) * input_length(config.model)
    flops_per_token = flops_lib.flops_per_token(config.model, training=True)
    peak = flops_lib.peak_flops_per_second(jax.devices()[0])
    peak_total = peak * jax.device_count() if peak else None

    latest = checkpointer.latest_step()
    if latest is not None:
        stage = stage_at(stage_list, latest)
        steps = runner.steps(stage)
        state, data_state, _ = checkpointer.restore(latest, steps.abstract_state)
        pipeline.set_iterator_state(data.train_iter, data_state)
        log(f"resumed from {checkpointer.directory} at step {latest}")
        if latest == stage.end and stage.index + 1 < len(stage_list):
            stage = stage_list[stage.index + 1]
            state = runner.enter(stage, state.params, latest, log)
            steps = runner.steps(stage)
    else:
        stage = stage_list[0]
        steps = runner.steps(stage)
        state = steps.init(jax.random.key(int(config.seed)))
        log(
            f"training {config.name}: {config.model.kind}, "
            f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M params, "
            f"{total} steps x {tokens_per_step} tokens, mesh {dict(steps.mesh.shape)}; "
            f"workdir {workdir}"
        )
        state = runner.enter(stage, state.params, 0, log)
    start_step = int(jax.device_get(state.step))
    last_saved = latest

    def save(step: int):
        nonlocal last_saved
        if last_saved == step:
            return
        checkpointer.save(step, state, pipeline.get_iterator_state(data.train_iter),
                          dict(meta, step=step, stage=stage.index, stage_name=stage.name))
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
    t_cfg = config.train

    with ckpt_lib.PreemptionGuard() as guard:
        step = start_step
        while step < total:
            if step == stage.end:  # the next curriculum stage
                flush_pending()
                save(step)
                stage = stage_list[stage.index + 1]
                state = runner.enter(stage, state.params, step, log)
                steps = runner.steps(stage)
                compile_s = None
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
            if tracing and (step >= window[1] or step == total):
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
            if step % t_cfg.log_every == 0 or step == total or guard.requested or stop:
                checked = flush_pending()
                _, last = checked[-1]
                elapsed = time.time() - window_start
                step_s = elapsed / window_steps if window_steps else float("nan")
                tok_s = tokens_per_step / step_s if window_steps else float("nan")
                eta = (total - step) * step_s
                train_metrics = summarize_sums(last)
                scalars = {
                    "train/loss": float(last["loss"]),
                    "train/grad_norm": float(last["grad_norm"]),
                    "train/lr": float(last["lr"]),
                }
                scalars.update({f"train/{k}": v for k, v in train_metrics.items()
                                if k not in ("loss", "tokens", "bytes") and not k.endswith(("_tokens", "_bytes"))})
                scalars.update({f"train/{k}": v for k, v in accounting(
                    config.model, last, int(config.train.batch_size)).items()})
                if len(stage_list) > 1:
                    scalars["train/stage"] = float(stage.index)
                if window_steps:
                    scalars.update({"perf/tokens_per_s": tok_s, "perf/step_s": step_s})
                    if peak_total:
                        scalars["perf/mfu"] = flops_lib.mfu(flops_per_token, tok_s, peak_total)
                writer.scalars(step, scalars)
                log(
                    f"step {step:>6}/{total} | loss {float(last['loss']):.4f} | "
                    f"lr {float(last['lr']):.2e} | {tok_s / 1e3:.1f}k tok/s | "
                    f"{step_s:.3f} s/step | ETA {metrics_lib.format_duration(eta)}"
                )
                window_start, window_steps = time.time(), 0

            if step % t_cfg.eval_every == 0 or step == total:
                flush_pending()
                evals = evaluate_all(steps, state.params, data.eval_batches)
                _log_eval(writer, log, step, evals)
                summary["evals"] = evals
                summary["eval"] = next(iter(evals.values()))
                window_start, window_steps = time.time(), 0

            if step % t_cfg.checkpoint_every == 0 or step == total or guard.requested or stop:
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
    if "evals" not in summary:
        summary["evals"] = evaluate_all(steps, state.params, data.eval_batches)
        summary["eval"] = next(iter(summary["evals"].values()))
    first_objective = next(iter(summary["evals"]))
    text, _, _ = target_bytes.exact_target_text(
        stage_config(config, stage), first_objective, data.tokenizer.pad_id, data.eval_batches,
        target_bytes.PieceBytes.from_tokenizer(data.tokenizer), summary["eval"]["bytes"])
    baselines = metrics_lib.compressor_bpb(text)
    summary["compressors"] = baselines
    log(results_table(summary["evals"], baselines))
    summary["params"] = state.params if step == total else None
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
