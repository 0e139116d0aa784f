"""Top-1 retrieval accuracy over candidate pools, and the BM25 lexical baseline on the same pools
(docs/retrieval.md#evaluation).

Held-out pairs (q_i, d_i), i < N. For a pool size P ≤ N, query i's pool is its own passage d_i and
P−1 other held-out passages drawn at random (seeded), in a random order; the query is answered
correctly when its own passage has the highest score in the pool (ties go to the candidate listed
first, so a constant scorer scores 1/P). Scores are cosine similarities of embeddings, or BM25
(Okapi, k1 = 1.5, b = 0.75, ``bm25s``) with the held-out passages as the collection; both are scored
on exactly the same pools.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax.data.pairs import pool_sizes
from mixers_jax.models.embedding import cosine_matrix, embed_rows

def make_pools(held_out: int, pool_size: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(int [Q, P] pools of passage indices, int [Q] the slot of each query's own passage) for the
    first ``queries`` (0: all) held-out queries."""
    n, p = int(held_out), int(pool_size)
    q = n if queries <= 0 else min(int(queries), n)
    rng = np.random.default_rng([int(seed), p])
    pools = np.empty((q, p), np.int64)
    answer = rng.integers(0, p, size=q)
    for i in range(q):
        others = rng.choice(n - 1, size=p - 1, replace=False)
        others = others + (others >= i)  # skip passage i itself
        pools[i] = np.insert(others, answer[i], i)
    return pools, answer


def top1(scores_QxN: np.ndarray, pools: np.ndarray, answer: np.ndarray) -> float:
    """Share of queries whose own passage scores highest in their pool (first slot wins ties)."""
    rows = np.arange(len(pools))[:, None]
    picked = np.argmax(scores_QxN[rows, pools], axis=1)
    return float(np.mean(picked == answer))


def top1_by_pool(scores_QxN: np.ndarray, sizes: Sequence[int], queries: int, seed: int) -> dict[int, float]:
    """{pool size: top-1 accuracy} of a [Q, N] score matrix (row i: query i, column j: passage j)."""
    n = scores_QxN.shape[1]
    out = {}
    for p in sizes:
        pools, answer = make_pools(n, p, queries, seed)
        out[int(p)] = top1(scores_QxN, pools, answer)
    return out


def bm25_scores(queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
    """float32 [Q, N] BM25 scores of each query against every passage (the passages are the
    collection; English stopwords removed, lower-cased word tokens)."""
    import bm25s  # imported lazily: it takes seconds to import (scipy, its selection backends)

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # no "Building index ..." lines
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(passages), stopwords="en", show_progress=False,
                                   return_ids=True), show_progress=False)
    q_tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False, return_ids=False)
    return np.stack([retriever.get_scores(t) if t else np.zeros(len(passages), np.float32)
                     for t in q_tokens]).astype(np.float32)


def embed_all(embed_fn: Callable, tokens: np.ndarray, lengths: np.ndarray, batch_size: int,
              pad_id: int) -> np.ndarray:
    """float32 [R, d] ``embed_fn(tokens [B, n], lengths [B])`` over rows in batches of one shape
    (the last batch is filled up with one-token pad rows, whose outputs are dropped)."""
    out = []
    for start in range(0, len(tokens), batch_size):
        tok, n = tokens[start:start + batch_size], lengths[start:start + batch_size]
        real = len(tok)
        if real < batch_size:
            tok = np.concatenate([tok, np.full((batch_size - real, tokens.shape[1]), pad_id, np.int32)])
            n = np.concatenate([n, np.ones((batch_size - real,), np.int32)])
        out.append(np.asarray(embed_fn(jnp.asarray(tok), jnp.asarray(n)))[:real])
    return np.concatenate(out).astype(np.float32)


def row_embedder(model, params, position: int, padding: str) -> Callable:
    """A jitted ``(tokens [B, n], lengths [B]) -> float32 [B, d]`` for ``model`` with ``params``."""
    def apply_fn(p, *args, **kw):
        return model.apply({"params": p}, *args, **kw)

    fn = jax.jit(lambda p, t, n: embed_rows(apply_fn, p, t, n, position, padding))
    return lambda t, n: fn(params, t, n)


def evaluate_pairs(embed_fn: Callable | None, rows, *, sizes: Sequence[int], queries: int = 0,
                   seed: int = 0, batch_size: int = 64, pad_id: int = 2, bm25: bool = True) -> dict:
    """Top-1 by pool size of the model (``embed_fn``, see :func:`row_embedder`; None: skipped) and
    of BM25 on held-out ``rows`` (a ``data.pairs.PairRows``): {'pool_sizes', 'queries',
    'held_out', 'model': {P: acc}, 'bm25': {P: acc}, 'chance': {P: 1/P}}."""
    n = len(rows)
    sizes = pool_sizes(sizes, n)
    out = {"pool_sizes": list(sizes), "held_out": n,
           "queries": n if queries <= 0 else min(int(queries), n),
           "chance": {p: 1.0 / p for p in sizes}}
    if embed_fn is not None:
        q = embed_all(embed_fn, rows.query, rows.query_length, batch_size, pad_id)
        d = embed_all(embed_fn, rows.passage, rows.passage_length, batch_size, pad_id)
        sim = np.asarray(cosine_matrix(jnp.asarray(q), jnp.asarray(d)))
        out["model"] = top1_by_pool(sim, sizes, queries, seed)
    if bm25:
        out["bm25"] = top1_by_pool(bm25_scores(rows.queries, rows.passages), sizes, queries, seed)
    return out


def retrieval_table(result: dict, label: str = "model") -> str:
    """Top-1 accuracy (%) by pool size: the model, BM25 and chance, one row each."""
    sizes = result["pool_sizes"]
    lines = [f"top-1 accuracy (%) over pools of held-out passages ({result['queries']} queries, "
             f"{result['held_out']} held-out pairs)",
             f"{'pool size':<12}" + "".join(f"{p:>8}" for p in sizes)]
    for key, name in (("model", label), ("bm25", "BM25"), ("chance", "chance")):
        if key in result:
            lines.append(f"{name:<12}" + "".join(f"{100 * result[key][p]:>8.1f}" for p in sizes))
    return "\n".join(lines)
