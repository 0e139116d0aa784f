"""The structure of learned token-mixing matrices (the library of ``python -m mixers_jax.inspect``).

For every layer (and head, and both matrices of expanded mixing) of a masked mixer or SRM, draws the
effective causal matrix A [n, n] (rows = output position i, columns = input position j; flat:
W ⊙ M, Toeplitz: T_ij = v_{i−j}, structured: the row/column-repeat matrix) as a heatmap PNG, and
reports how close it is to each structure as the relative Frobenius error ‖A − Â‖_F / ‖A‖_F of
the best structured approximation Â (lower triangle):

* toeplitz: Â_ij = mean of A's diagonal i − j (the exact least-squares Toeplitz fit);
* col_repeat (Â_ij = v_i δ^(i−j)) and row_repeat (Â_ij = v_j δ^(i−j)): for each δ on a grid in
  [0.5, 1] the least-squares v in closed form (per row, per column), the best δ kept.

:func:`inspect_run` writes ``layer{L}[_head{H}][_{w1|w2}].png`` and ``structure.json`` (one record
per matrix).
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from mixers_jax.config import field
from mixers_jax.errors import UserError
from mixers_jax.models.specs import mixer_spec

DELTAS = np.concatenate([np.linspace(0.5, 0.99, 50), np.linspace(0.991, 1.0, 10)])


def effective_matrices(run) -> list[tuple[str, np.ndarray]]:
    """[(name, A [n, n] float64)] for every token-mixing matrix of the model (one per head and,
    with ``model.kernel`` k > 1, per tap), as the forward pass applies it: the mixing op's
    ``matrix`` from ``models.mixing.MIXING_OPS`` (unmasked as trained when ``model.causal`` is
    False: a two-sided Toeplitz v of length 2n−1 gives T_ij = v_{i−j+n−1})."""
    m = run.config.model
    if field(m, "kind") != "mixer":
        raise UserError(f"model.kind {field(m, 'kind')!r} has no token-mixing matrices to inspect")
    spec = mixer_spec(m)
    mixing, op = spec.token_mixing, spec.token_mixing.op
    out = []
    for layer in range(spec.n_layers):
        p = run.params[f"block_{layer}"]["mix"]
        for suffix in ("1", "2") if mixing.expanded else ("",):
            params = {key: jnp.asarray(p[key + suffix]) for key in (op.weight, "c", "lam")
                      if key + suffix in p}
            a = np.asarray(op.matrix(params, mixing), np.float64)
            per_tap = list(np.moveaxis(a, -1, 0)) if mixing.kernel > 1 else [a]
            for t, at in enumerate(per_tap):
                heads = [at] if at.ndim == 2 else list(at)
                for h, ah in enumerate(heads):
                    name = f"layer{layer}"
                    if at.ndim == 3:
                        name += f"_head{h}"
                    if len(per_tap) > 1:
                        name += f"_tap{t}"
                    if suffix:
                        name += f"_w{suffix}"
                    out.append((name, ah))
    return out


def toeplitz_error(a: np.ndarray) -> float:
    """Relative error of the best Toeplitz fit (each diagonal i − j replaced by its mean)."""
    n = a.shape[0]
    mask = np.tril(np.ones((n, n), bool))
    norm = np.linalg.norm(a[mask])
    if norm == 0:
        return 0.0
    lag = np.subtract.outer(np.arange(n), np.arange(n))
    means = np.bincount(lag[mask], weights=a[mask], minlength=n) / np.bincount(lag[mask], minlength=n)
    return float(np.linalg.norm((a - means[np.clip(lag, 0, n - 1)])[mask]) / norm)


def repeat_error(a: np.ndarray, kind: str) -> tuple[float, float]:
    """(relative error, best δ) of the best column-repeat (v_i δ^(i−j)) or row-repeat (v_j δ^(i−j))
    approximation over the δ grid."""
    n = a.shape[0]
    mask = np.tril(np.ones((n, n), bool))
    norm = np.linalg.norm(a[mask])
    if norm == 0:
        return 0.0, 1.0
    lag = np.clip(np.subtract.outer(np.arange(n), np.arange(n)), 0, None)
    best = (np.inf, 1.0)
    axis = 1 if kind == "col" else 0  # col: one v per row i (sum over j); row: one v per column j
    for d in DELTAS:
        basis = np.where(mask, d ** lag, 0.0)
        v = (a * basis).sum(axis) / (basis**2).sum(axis)
        approx = basis * (v[:, None] if kind == "col" else v[None, :])
        err = np.linalg.norm((a - approx)[mask]) / norm
        if err < best[0]:
            best = (float(err), float(d))
    return best


def analyse(a: np.ndarray) -> dict:
    """The relative errors of the best Toeplitz, column-repeat and row-repeat fits of ``a``."""
    col, d_col = repeat_error(a, "col")
    row, d_row = repeat_error(a, "row")
    return {"toeplitz": toeplitz_error(a), "col_repeat": col, "col_delta": d_col,
            "row_repeat": row, "row_delta": d_row}


def draw(a: np.ndarray, title: str, path: str) -> None:
    """A heatmap PNG of ``a`` (diverging colours, symmetric around 0) at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = float(np.abs(a).max()) or 1.0
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=100)
    im = ax.imshow(a, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_xlabel("input position j")
    ax.set_ylabel("output position i")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def inspect_run(run, out_dir: str, plots: bool = True) -> list[dict]:
    """Writes a heatmap per matrix (with ``plots``) and ``structure.json`` into ``out_dir``;
    returns one record per matrix (name and :func:`analyse`'s errors)."""
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for name, a in effective_matrices(run):
        rec = {"matrix": name, **analyse(a)}
        records.append(rec)
        if plots:
            draw(a, f"{name}: rel. err Toeplitz {rec['toeplitz']:.3f}, col {rec['col_repeat']:.3f}, "
                    f"row {rec['row_repeat']:.3f}", os.path.join(out_dir, f"{name}.png"))
    with open(os.path.join(out_dir, "structure.json"), "w", encoding="utf-8") as f:
        json.dump({"workdir": run.workdir, "step": run.step, "matrices": records}, f, indent=2)
    return records
