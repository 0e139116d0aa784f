"""Loss functions. Each takes ``(apply_fn, params, batch)`` and returns ``(loss, metrics)``.

Objectives are built by name with :func:`build` from an :class:`ObjectiveContext` (the model and
train configs and the tokenizer's pad id), so that chunked or copy objectives can read the sizes
they need; ``OBJECTIVES`` maps each name to such a factory.

``apply_fn(params, tokens_BxN) -> logits_BxNxV``. Batches are dicts of ``tokens`` (int32),
``loss_mask`` (1.0 where a token may be a target; pads and EOS are 0, REFERENCE §1) and
``token_bytes`` (UTF-8 bytes each token decodes to). ``metrics`` are *sums* (``nll``, ``tokens``,
``correct``, ``bytes``) so they aggregate exactly across micro-batches, devices and eval batches;
:mod:`mixers_jax.metrics` turns them into loss, accuracy and bits per byte.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp


def token_nll(logits_BxNxV: jax.Array, targets_BxN: jax.Array) -> jax.Array:
    """Natural-log cross-entropy of each target, computed in float32."""
    logp_BxNxV = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BxNxV, targets_BxN[..., None], axis=-1)[..., 0]


def masked_sums(logits_BxNxV, targets_BxN, mask_BxN, bytes_BxN) -> dict[str, jax.Array]:
    """Summed NLL, counted targets, correct argmax predictions and target bytes."""
    mask_BxN = mask_BxN.astype(jnp.float32)
    nll_BxN = token_nll(logits_BxNxV, targets_BxN)
    correct_BxN = (jnp.argmax(logits_BxNxV, axis=-1) == targets_BxN).astype(jnp.float32)
    return {
        "nll": jnp.sum(nll_BxN * mask_BxN),
        "tokens": jnp.sum(mask_BxN),
        "correct": jnp.sum(correct_BxN * mask_BxN),
        "bytes": jnp.sum(bytes_BxN.astype(jnp.float32) * mask_BxN),
    }


def clm(apply_fn: Callable, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Causal LM: output i predicts token i+1 (REFERENCE §2.2); the last output is never trained.

    The loss is the token mean over the batch's counted targets.
    """
    logits_BxNxV = apply_fn(params, batch["tokens"])
    sums = masked_sums(
        logits_BxNxV[:, :-1],
        batch["tokens"][:, 1:],
        batch["loss_mask"][:, 1:],
        batch["token_bytes"][:, 1:],
    )
    loss = sums["nll"] / jnp.maximum(sums["tokens"], 1.0)
    return loss, sums


def autoencode(apply_fn: Callable, params, batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Autoencoder reconstruction: output i predicts token i itself, unshifted (REFERENCE §4)."""
    logits_BxNxV = apply_fn(params, batch["tokens"])
    sums = masked_sums(logits_BxNxV, batch["tokens"], batch["loss_mask"], batch["token_bytes"])
    loss = sums["nll"] / jnp.maximum(sums["tokens"], 1.0)
    return loss, sums


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    """What an objective factory may read: ``config.model``, ``config.train`` and the pad id."""

    model: Any
    train: Any
    pad_id: int = 2


Objective = Callable[[Callable, Any, dict], tuple[jax.Array, dict[str, jax.Array]]]

OBJECTIVES: dict[str, Callable[[ObjectiveContext], Objective]] = {
    "clm": lambda ctx: clm,
    "autoencode": lambda ctx: autoencode,
}


def build(name: str, ctx: ObjectiveContext) -> Objective:
    """The loss function called ``name`` for the model and settings in ``ctx``."""
    from mixers_jax.errors import UserError

    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](ctx)
