"""Input inversion: how much of the input the first k blocks' output still holds
(docs/analysis.md#input-inversion).

For tokens t [B, n] with input embeddings x* = E t and target y = f_k(x*) (f_k = the first k blocks,
``blocks_output``), plain gradient descent from a random start x⁰ ~ N(0, 1) minimises the summed L1
distance

    L(x) = Σ_{b,i,d} |f_k(x)_{b,i,d} − y_{b,i,d}|,    x^{s+1} = x^s − η_s ∇L(x^s),

with η_s decaying linearly from ``lr`` to ``lr_end`` over ``steps`` steps (0.02 → 0.002, 500 steps).
The recovered embeddings are mapped back to token scores through the embedding's pseudo-inverse,
c = x̂ E⁺ [B, n, V] (E [V, d], so x̂ E⁺ is the least-squares coefficient of each token's row), and the
**normalized Hamming error** is the fraction of non-pad positions whose true token is not among the
5 highest scores: 0 when the output determines the input, 1 − 5/V for a chance guess.

Rows are optimised together (one jitted ``lax.fori_loop`` per depth; the rows do not interact, as
the loss is a sum over rows). Models: the causal LMs ('mixer', 'transformer'), whose ``embed``
table is the input they invert.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax import figures
from mixers_jax.config import field
from mixers_jax.errors import UserError

INVERTIBLE_KINDS = ("mixer", "transformer")
TOP = 5


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Plain gradient descent: ``steps`` steps, lr linear from ``lr`` to ``lr_end``."""

    steps: int = 500
    lr: float = 0.02
    lr_end: float = 0.002

    def lr_at(self, s: jax.Array) -> jax.Array:
        """η_s = lr·(S − s)/S + lr_end·s/S."""
        frac = s.astype(jnp.float32) / self.steps
        return self.lr * (1.0 - frac) + self.lr_end * frac


def check_invertible(model_cfg) -> int:
    """The model's depth; ``UserError`` for a kind without a token embedding feeding its blocks."""
    kind = field(model_cfg, "kind")
    if kind not in INVERTIBLE_KINDS:
        raise UserError(
            f"model.kind {kind!r} has no single token embedding feeding its blocks to invert; "
            f"input inversion takes a causal LM ({', '.join(INVERTIBLE_KINDS)})")
    return int(field(model_cfg, "n_layers"))


def check_depths(depths: Sequence[int], n_layers: int) -> list[int]:
    """``depths`` (each 1..n_layers), or ``UserError`` naming the first one out of range."""
    for k in depths:
        if not 1 <= int(k) <= n_layers:
            raise UserError(f"depth k={k} is larger than the model's depth {n_layers}"
                            if int(k) > n_layers else f"depth k={k} must be at least 1")
    return [int(k) for k in depths]


def pseudo_inverse_scores(x_BxNxD: jax.Array, embedding_VxD: jax.Array) -> jax.Array:
    """c = x E⁺ [B, n, V]: each position's least-squares coefficients over the token embeddings."""
    pinv_DxV = jnp.linalg.pinv(embedding_VxD.astype(jnp.float32))
    return jnp.einsum("bnd,dv->bnv", x_BxNxD.astype(jnp.float32), pinv_DxV)


def hamming_error(scores_BxNxV: jax.Array, tokens_BxN: jax.Array, valid_BxN: jax.Array,
                  top: int = TOP) -> tuple[float, int]:
    """(fraction of valid positions whose token is not among the ``top`` highest scores, count)."""
    _, idx = jax.lax.top_k(scores_BxNxV, top)
    hit = jnp.any(idx == tokens_BxN[..., None], axis=-1)
    valid = valid_BxN.astype(bool)
    count = int(jnp.sum(valid))
    if count == 0:
        raise UserError("no non-pad token to invert")
    return float(jnp.sum(valid & ~hit) / count), count


def optimise_inputs(blocks_fn, x0_BxNxD: jax.Array, target_BxNxD: jax.Array,
                    schedule: Schedule) -> tuple[jax.Array, jax.Array]:
    """Plain gradient descent on Σ|blocks_fn(x) − target| from x0: (x̂, final L1 loss)."""

    def loss(x):
        return jnp.sum(jnp.abs(blocks_fn(x).astype(jnp.float32) - target_BxNxD))

    grad = jax.grad(loss)

    def step(s, x):
        return x - schedule.lr_at(s) * grad(x)

    x = jax.lax.fori_loop(0, schedule.steps, step, x0_BxNxD.astype(jnp.float32))
    return x, loss(x)


@functools.partial(jax.jit, static_argnames=("model", "depth", "schedule"))
def _invert(model, params, tokens_BxN, key, depth: int, schedule: Schedule):
    variables = {"params": params}
    x_true = model.apply(variables, tokens_BxN, method="embed_tokens")

    def blocks_fn(x):
        return model.apply(variables, x, depth, method="blocks_output")

    target = jax.lax.stop_gradient(blocks_fn(x_true)).astype(jnp.float32)
    x0 = jax.random.normal(key, x_true.shape, jnp.float32)
    x_hat, final = optimise_inputs(blocks_fn, x0, target, schedule)
    start = jnp.sum(jnp.abs(blocks_fn(x0).astype(jnp.float32) - target))
    return pseudo_inverse_scores(x_hat, params["embed"]["embedding"]), start, final


def invert_depths(model, params, tokens_BxN: np.ndarray, valid_BxN: np.ndarray,
                  depths: Sequence[int], schedule: Schedule = Schedule(), seed: int = 0,
                  log=None) -> list[dict[str, Any]]:
    """One record per depth k: ``{'depth', 'error', 'tokens', 'l1_start', 'l1_final'}``, the normalized
    Hamming error of the inputs recovered from the first k blocks' output (module docstring)."""
    records = []
    tokens = jnp.asarray(tokens_BxN, jnp.int32)
    for k in depths:
        key = jax.random.fold_in(jax.random.key(seed), k)
        scores, start, final = _invert(model, params, tokens, key, int(k), schedule)
        err, count = hamming_error(scores, tokens, jnp.asarray(valid_BxN))
        rec = {"depth": int(k), "error": err, "tokens": count,
               "l1_start": float(start), "l1_final": float(final)}
        if log is not None:
            log(rec)
        records.append(rec)
    return records


def format_table(results: Sequence[dict]) -> str:
    """Depth rows, one column per result (``label`` and ``records``)."""
    depths = sorted({r["depth"] for res in results for r in res["records"]})
    width = max([12] + [len(res["label"]) for res in results])
    lines = ["depth k  " + "  ".join(f"{res['label']:>{width}}" for res in results)]
    for k in depths:
        cells = []
        for res in results:
            err = next((r["error"] for r in res["records"] if r["depth"] == k), None)
            cells.append(f"{err:>{width}.4f}" if err is not None else " " * (width - 1) + "-")
        lines.append(f"{k:>7}  " + "  ".join(cells))
    return "\n".join(lines)


def plot(results: Sequence[dict], path: str) -> None:
    """Normalized Hamming error against depth, one line per result, written to ``path``."""
    fig, ax = figures.pyplot().subplots(figsize=(7.5, 3.6))
    depths = sorted({r["depth"] for res in results for r in res["records"]})
    for res in results:  # untrained weights dashed
        rec = sorted(res["records"], key=lambda r: r["depth"])
        ax.plot([r["depth"] for r in rec], [r["error"] for r in rec], marker="o", label=res["label"],
                linestyle="--" if res.get("untrained") else "-")
    ax.set_xticks(depths)
    ax.set_xlabel("depth k (blocks)")
    ax.set_ylabel("normalized Hamming error (top-5)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    figures.save(fig, path)
