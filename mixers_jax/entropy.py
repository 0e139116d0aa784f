"""Per-position entropies of a text by shifting, and the two-model form (docs/analysis.md#entropy).

S(x) is a model's *summed* cross-entropy (nats) over a row x, pads never targets: output i counts
when token i+1 is not a pad. For a text t_0..t_{T−1} and a model of context n, lp_n(t_{0..j}) is the
left-padded row [pad, …, pad, t_0, …, t_j] of n tokens. Removing one trailing token at a time,

    H_j = S_long(lp_n(t_{0..j})) − S_short(lp_{n'}(t_{0..j−1})),   j = 0..T−1,

is the conditional entropy estimate (nats) of token j given t_{<j} (S of an all-pad row is 0).
The **shifting method** uses one model for both terms (n' = n: the shorter row is the longer one
shifted right by a pad, its last token dropped); the **two-model form** takes S_short from a second
model of context n' (e.g. n − 1), trained like the first. With an oracle-memory model
(embedding_clm) each row gets its own encoder embedding. Every row keeps at least one leading pad,
so t_0 is a target in each (predicted from the pad context): a text may hold at most
min(n, n' + 1) − 1 tokens. For a causal model whose predictions ignore leading pads, H_j is
exactly −log p(t_j | t_{<j}) (tested against such a model in closed form).
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax.config import field
from mixers_jax.errors import UserError

ENTROPY_KINDS = ("embedding_clm", "mixer", "transformer")


def check_entropy_model(model_cfg) -> int:
    """The model's context n; ``UserError`` for a kind whose rows are not one causal context."""
    kind = field(model_cfg, "kind")
    if kind not in ENTROPY_KINDS:
        raise UserError(f"model.kind {kind!r} is not a causal LM over one context; the entropy probe "
                        f"takes {', '.join(ENTROPY_KINDS)}")
    return int(field(model_cfg, "n_ctx"))


def max_text_tokens(n_long: int, n_short: int | None = None) -> int:
    """The longest text (tokens) both rows of every position hold with one leading pad."""
    return min(n_long, (n_long if n_short is None else n_short) + 1) - 1


def check_text_length(tokens: Sequence[int], n_long: int, n_short: int | None = None) -> None:
    limit = max_text_tokens(n_long, n_short)
    if len(tokens) > limit:
        raise UserError(f"the text has {len(tokens)} tokens, longer than the context allows: the "
                        f"entropy probe takes at most {limit} (n_ctx − 1, one leading pad)")
    if not tokens:
        raise UserError("the text is empty")


def left_padded(tokens: Sequence[int], n: int, pad_id: int) -> np.ndarray:
    """int32 [n]: ``tokens`` right-aligned after pads."""
    row = np.full((n,), pad_id, np.int32)
    if len(tokens):
        row[n - len(tokens):] = np.asarray(tokens, np.int32)
    return row


def prefix_rows(tokens: Sequence[int], n: int, pad_id: int) -> np.ndarray:
    """[T, n]: row j = lp_n(t_{0..j})."""
    return np.stack([left_padded(tokens[: j + 1], n, pad_id) for j in range(len(tokens))])


def summed_nll_fn(logits_fn: Callable, pad_id: int, batch: int = 32) -> Callable[[np.ndarray], np.ndarray]:
    """rows [R, n] -> S per row [R] float64, from ``logits_fn(tokens [b, n]) -> logits [b, n, V]``
    (jitted, ``batch`` rows at a time; the last batch filled with pad rows)."""

    @jax.jit
    def sums(rows_BxN):
        logp = jax.nn.log_softmax(logits_fn(rows_BxN)[:, :-1].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, rows_BxN[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(nll * (rows_BxN[:, 1:] != pad_id), axis=-1)

    def run(rows: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(rows), batch):
            chunk = rows[start:start + batch]
            fill = np.full((batch - len(chunk), rows.shape[1]), pad_id, np.int32)
            out.append(np.asarray(sums(jnp.asarray(np.concatenate([chunk, fill]))))[: len(chunk)])
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0,), np.float64)

    return run


def conditional_entropies(tokens: Sequence[int], pad_id: int, sum_long: Callable, n_long: int,
                          sum_short: Callable | None = None, n_short: int | None = None
                          ) -> dict[str, np.ndarray]:
    """H_j for j = 0..T−1 (module docstring) with the summed-CE functions of :func:`summed_nll_fn`;
    ``sum_short`` None: the shifting method with ``sum_long`` (n' = n). Returns ``entropy`` [T],
    ``s_long`` [T] = S_long(lp_n(t_{0..j})) and ``s_short`` [T] = S_short(lp_{n'}(t_{0..j−1}))."""
    tokens = [int(t) for t in tokens]
    if sum_short is None:
        sum_short, n_short = sum_long, n_long
    check_text_length(tokens, n_long, n_short)
    s_long = sum_long(prefix_rows(tokens, n_long, pad_id))
    s_short = np.concatenate([[0.0], sum_short(prefix_rows(tokens[:-1], n_short, pad_id))
                              if len(tokens) > 1 else np.zeros((0,))])
    return {"entropy": s_long - s_short, "s_long": s_long, "s_short": s_short}

