"""Loss functions. Each takes ``(apply_fn, params, batch)`` and returns ``(loss, metrics)``.

``apply_fn(params, tokens_BxN) -> logits_BxNxV``. Batches are dicts of ``tokens`` (int32),
``loss_mask`` (1.0 where a token may be a target; pads and EOS are 0, REFERENCE §1) and
``token_bytes`` (UTF-8 bytes each token decodes to). ``metrics`` are *sums* (``nll``, ``tokens``,
``correct``, ``bytes``) so they aggregate exactly across micro-batches, devices and eval batches;
:mod:`mixers_jax.metrics` turns them into loss, accuracy and bits per byte.
"""
from __future__ import annotations

from typing import Callable

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


OBJECTIVES: dict[str, Callable] = {"clm": clm}


def get_objective(name: str) -> Callable:
    from mixers_jax.errors import UserError

    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; choose one of: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]
