"""Curricula: the stages of a run, frozen parameter groups, and ``init_from`` parameter loading.

A run is a list of :class:`Stage` s (``train.stages``, or one stage made of ``train.*``). Each stage
restarts the optimizer (fresh moments, its own warmup and decay to 0) and keeps the parameters; it
may freeze top-level parameter groups (``train.frozen``) and copy subtrees of another trained run's
parameters into this model (``train.init_from`` + ``train.init_map``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mixers_jax import objectives
from mixers_jax.errors import UserError

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


def csv_names(text) -> tuple[str, ...]:
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


def stage_at(stage_list: list[Stage], step: int) -> Stage:
    """The stage that produced a checkpoint at ``step`` (step 0: the first); UserError for a step
    beyond the last stage."""
    if step <= 0:
        return stage_list[0]
    for st in stage_list:
        if st.start < step <= st.end:
            return st
    raise UserError(f"step {step} lies beyond the run's last step {stage_list[-1].end}")


def stage_config(config, stage: Stage):
    """``config`` with ``train`` replaced by the stage's (for build_steps)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.train = ml_collections.ConfigDict(stage.train.to_dict())
    return c


def eval_objective_names(train_cfg) -> tuple[str, ...]:
    return csv_names(train_cfg.eval_objectives) or (str(train_cfg.objective),)


def param_labels(params: Any, train_cfg) -> Any:
    """'frozen' for every leaf under a top-level group named in ``train.frozen``, else 'train'.

    With ``frozen_encoder_embedding`` 'fresh_trainable' (the default, docs/objectives.md#frozen-encoders) or
    'pretrained_trainable', a frozen group's own token embedding (its ``embed`` child) stays trainable.
    """
    frozen = set(csv_names(train_cfg.frozen))
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


# --------------------------------------------------------------------------- init_from


def init_sources(stage_list: list[Stage]) -> list[str]:
    """The ``init_from`` workdirs of the stages, in stage order ('' entries left out)."""
    return [str(st.train.init_from) for st in stage_list if str(st.train.init_from)]


def _subtree(tree: Any, path: str, what: str) -> Any:
    node = tree
    if path in (".", ""):
        return node
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise UserError(f"{what} has no parameter group {path!r} (it has {sorted(node)})")
        node = node[key]
    return node


def init_map(stage: Stage, source_params: Any) -> list[tuple[str, str]]:
    """(target, source) subtree pairs of ``train.init_map``; by default a trained model's encoder,
    or a whole causal LM, into our encoder."""
    pairs = csv_names(stage.train.init_map)
    if not pairs:
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
    ``frozen_encoder_embedding='fresh_trainable'``
    (a new N(0,1) embedding; docs/objectives.md#frozen-encoders).
    """
    frozen = set(csv_names(stage.train.frozen))
    fresh = str(stage.train.frozen_encoder_embedding) == "fresh_trainable"
    out = jax.tree.map(lambda x: x, params)
    for target, source in init_map(stage, source_params):
        skip = f"{target}/embed" if fresh and target.split("/")[0] in frozen else None
        _copy_leaves(_subtree(out, target, "this model"),
                     _subtree(source_params, source, f"the checkpoint in {source_name}"),
                     target, skip, f"{source_name} ({source})")
    return out


def _block_count(node: dict) -> int:
    """L when ``node`` holds unscanned blocks ``block_0`` .. ``block_{L-1}``, else 0."""
    count = 0
    while isinstance(node, dict) and f"block_{count}" in node:
        count += 1
    return count


def _stack(*leaves):
    if isinstance(leaves[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
    return np.stack([np.asarray(x) for x in leaves])


def _unstack(leaf, i: int):
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
    return np.asarray(leaf)[i]


def in_block_layout(tgt_node: dict, src_node: dict) -> dict:
    """``src_node`` with its blocks in ``tgt_node``'s layout (``model.scan_layers``): unscanned
    ``block_i/...`` leaves become one ``blocks/...`` leaf stacked along a leading layer axis, or a
    stacked ``blocks/...`` leaf [L, ...] becomes ``block_0`` .. ``block_{L-1}``. So a run trained
    with either layout loads into a model with the other (the same weights, layer for layer)."""
    if not isinstance(src_node, dict) or not isinstance(tgt_node, dict):
        return src_node
    if "blocks" in tgt_node and "blocks" not in src_node and _block_count(src_node):
        count = _block_count(src_node)
        out = {k: v for k, v in src_node.items() if not k.startswith("block_")}
        out["blocks"] = jax.tree.map(_stack, *[src_node[f"block_{i}"] for i in range(count)])
        return out
    if _block_count(tgt_node) and "block_0" not in src_node and "blocks" in src_node:
        stacked = src_node["blocks"]
        depth = _shape(jax.tree.leaves(stacked)[0])[0]
        out = {k: v for k, v in src_node.items() if k != "blocks"}
        for i in range(depth):
            out[f"block_{i}"] = jax.tree.map(lambda leaf, i=i: _unstack(leaf, i), stacked)
        return out
    return src_node


def _copy_leaves(tgt_node: dict, src_node: dict, prefix: str, skip: str | None, source: str) -> None:
    """Copies every leaf of ``tgt_node`` from ``src_node`` in place, checking shapes (blocks
    converted between the scanned and unscanned layouts, :func:`in_block_layout`)."""
    src_node = in_block_layout(tgt_node, src_node)
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
                                "(a different width, depth, context or vocabulary)")
            value = src_node[key]
            tgt_node[key] = value if isinstance(value, jax.ShapeDtypeStruct) else np.asarray(value)


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def check_stage(config, stage: Stage, params: Any, source: tuple[Any, Any] | None = None) -> None:
    """Raises UserError for a stage that cannot run: its objectives, frozen groups, and the shapes
    of what it would load from ``init_from`` (compared without loading any array).

    ``params``: this model's parameters (or their shapes); ``source``: (parameter shapes, config) of
    the stage's ``init_from`` run (``workdir.init_source``), None without init_from.
    """
    ctx = objectives.context(config, train=stage.train)
    for name in (str(stage.train.objective),) + eval_objective_names(stage.train):
        objectives.build(name, ctx)
    param_labels(params, stage.train)
    if str(stage.train.init_from):
        source_params, source_cfg = source
        path = os.path.abspath(str(stage.train.init_from))
        if int(source_cfg.model.vocab_size) != int(config.model.vocab_size):
            raise UserError(
                f"train.init_from {path} has vocabulary {source_cfg.model.vocab_size}, this model "
                f"{config.model.vocab_size}")
        merge_init_params(params, source_params, stage, path)
    elif csv_names(stage.train.init_map):
        raise UserError("train.init_map is set but train.init_from is empty")
