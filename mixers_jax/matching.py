"""Direct embedding matching: the data of the matcher (docs/search.md#direct-embedding-matching).

A frozen generative model (the run in ``data.embedder``) embeds every query and passage of the
retrieval pairs once; the embeddings are cached in one file (``data.embedding_cache``, default
``<workdir>/embedding_cache.npz``, written atomically and keyed by the model's fingerprint and a
hash of the pair texts, so a changed model or pair set is embedded again). The matcher then trains
on pools drawn from the cache:

    row b: [e(q_b), e(c_1), ..., e(c_K)]    K = model.n_ctx − 1 candidates, the positive p_b at a
                                            uniformly random position t_b, K − 1 negatives drawn
                                            without replacement from the other passages of the split

Training pools come from the training pairs, drawn afresh for each step from (seed, step), so a
resumed run sees the same batches; evaluation pools from the held-out pairs, one pool per held-out
query (the first ``train.eval_batches × train.batch_size`` in training; in ``evaluate`` the first
``--max_rows``, else ``retrieval.eval_queries``, 0: all), drawn from the seed exactly as
``ranking.make_pools`` draws the pools of the InfoNCE and BM25 evaluation, so with the same pairs
and seed a pool of K candidates is the very pool those are scored on. ``match`` (the matcher) and
``match_cosine`` (cosine similarity of the frozen embeddings, a baseline) share the pools.

:func:`build_data` is the trainer's data builder for kind 'matcher' (``trainer.run(...,
build_data=matching.build_data)``); :func:`evaluate_matcher` is ``evaluate``'s path for it.
"""
from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence

import grain
import numpy as np

from mixers_jax import ranking, search_index
from mixers_jax.data import pairs as pairs_lib
from mixers_jax.data.pipeline import DataBundle
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic

CACHE_FILE = "embedding_cache.npz"


def pairs_digest(train: Sequence[tuple[str, str]], held: Sequence[tuple[str, str]]) -> str:
    """sha256 of the pair texts of both splits, in order."""
    h = hashlib.sha256()
    for split in (train, held):
        h.update(len(split).to_bytes(8, "little"))
        for q, p in split:
            for text in (q, p):
                data = text.encode("utf-8")
                h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


class PairEmbeddings:
    """float32 query and passage embeddings [N, d] of the training and held-out pairs."""

    def __init__(self, arrays: dict[str, np.ndarray], key: str):
        self.train_q, self.train_p = arrays["train_q"], arrays["train_p"]
        self.held_q, self.held_p = arrays["held_q"], arrays["held_p"]
        self.key = key

    @property
    def dim(self) -> int:
        return int(self.train_q.shape[1])


def cache_key(embedder, train, held) -> str:
    return f"{embedder.fingerprint}:{pairs_digest(train, held)}"


def read_cache(path: str, key: str) -> PairEmbeddings | None:
    """The cached embeddings at ``path`` if they were made for ``key``; None otherwise."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            return PairEmbeddings({k: z[k] for k in ("train_q", "train_p", "held_q", "held_p")}, key)
    except (OSError, ValueError, KeyError):
        return None  # unreadable or from an older layout: embedded again


def embed_pairs(embedder, train, held, log=print) -> PairEmbeddings:
    """Embeds the queries and passages of both splits with the frozen ``embedder``."""
    arrays = {}
    for name, split in (("train", train), ("held", held)):
        for side, i in (("q", 0), ("p", 1)):
            texts = [pair[i] for pair in split]
            log(f"embedding {len(texts)} {name} {'queries' if side == 'q' else 'passages'}")
            arrays[f"{name}_{side}"] = np.asarray(embedder.embed_texts(texts), np.float32)
    return PairEmbeddings(arrays, cache_key(embedder, train, held))


def write_cache(path: str, emb: PairEmbeddings) -> None:
    buf = io.BytesIO()
    np.savez(buf, key=np.asarray(emb.key), train_q=emb.train_q, train_p=emb.train_p,
             held_q=emb.held_q, held_p=emb.held_p)
    write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- pools


def draw_pools(rng: np.random.Generator, rows: np.ndarray, n_passages: int, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(candidates [R, k] passage indices, target [R]): row r's positive is passage ``rows[r]``,
    placed at a uniform position among k − 1 distinct other passages."""
    cand = np.empty((len(rows), k), np.int64)
    target = rng.integers(0, k, size=len(rows))
    for r, pos in enumerate(rows):
        neg = rng.choice(n_passages - 1, size=k - 1, replace=False)
        neg = neg + (neg >= pos)  # skip the positive itself
        cand[r] = np.insert(neg, target[r], pos)
    return cand, target.astype(np.int32)


def pool_batch(q_NxD: np.ndarray, p_NxD: np.ndarray, rows: np.ndarray, cand: np.ndarray,
               target: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
    """{'embeddings' [R, k+1, d] (the query first), 'target' [R], 'weight' [R]}."""
    emb = np.concatenate([q_NxD[rows][:, None], p_NxD[cand]], axis=1).astype(np.float32)
    return {"embeddings": emb, "target": target.astype(np.int32), "weight": weight.astype(np.float32)}


def check_pool(k: int, n_train: int, n_held: int, batch: int) -> None:
    if n_train < max(k, batch):
        raise UserError(f"{n_train} training pairs are fewer than one batch of candidates (pool of "
                        f"{k} = model.n_ctx - 1, batch {batch}); use more pairs or a smaller pool")
    if n_held < k:
        raise UserError(f"the pool size {k} (model.n_ctx - 1) is larger than the held-out set "
                        f"({n_held} pairs); use a smaller pool or hold out more pairs")


def train_iterator(emb: PairEmbeddings, k: int, batch: int, seed: int, process_index: int = 0):
    """Endless, checkpointable iterator of training pool batches (step i's pools from (seed, i))."""
    n = len(emb.train_q)

    def make(i):
        rng = np.random.default_rng((int(seed), int(process_index), int(i)))
        rows = rng.choice(n, size=batch, replace=False)
        cand, target = draw_pools(rng, rows, n, k)
        return pool_batch(emb.train_q, emb.train_p, rows, cand, target, np.ones(batch))

    ds = grain.MapDataset.range(1 << 62).map(make)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def eval_batches(emb: PairEmbeddings, k: int, batch: int, max_queries: int, seed: int
                 ) -> list[dict[str, np.ndarray]]:
    """One pool per held-out query (the first ``max_queries``; 0: all), the last batch filled up
    with weight-0 rows."""
    n = len(emb.held_q)
    queries = n if max_queries <= 0 else min(n, max_queries)
    rows = np.arange(queries)
    cand, target = ranking.make_pools(n, k, queries, seed)  # the pools of BM25 and InfoNCE too
    out = []
    for start in range(0, queries, batch):
        r, c, t = rows[start:start + batch], cand[start:start + batch], target[start:start + batch]
        w = np.ones(len(r))
        if len(r) < batch:  # filler rows repeat the first query, weight 0
            fill = batch - len(r)
            r, c, t = (np.concatenate([a, np.repeat(a[:1], fill, axis=0)]) for a in (r, c, t))
            w = np.concatenate([w, np.zeros(fill)])
        out.append(pool_batch(emb.held_q, emb.held_p, r, c, t, w))
    return out


# --------------------------------------------------------------------------- the trainer's data


def load_pairs(config) -> tuple[list[tuple[str, str]], list[tuple[str, str]], dict]:
    """(training pairs, held-out pairs, cleaning statistics) of ``config.retrieval``."""
    train, held, stats = pairs_lib.load_split_pairs(config.retrieval)
    return list(zip(train.queries, train.passages)), list(zip(held.queries, held.passages)), stats


def cache_path(config, workdir: str | None) -> str:
    """``data.embedding_cache``, else ``<workdir>/embedding_cache.npz`` ('' without a workdir)."""
    path = str(config.data.get("embedding_cache", "") or "")
    return path or (os.path.join(workdir, CACHE_FILE) if workdir else "")


def pair_embeddings(config, workdir: str | None, log=print) -> tuple[PairEmbeddings, object, dict, bool]:
    """(embeddings, the frozen embedder, pair statistics, read from the cache?) of ``config``:
    checks the embedder run, the pair counts against the pool and batch, and the width."""
    source = str(config.data.get("embedder", "") or "")
    if not source:
        raise UserError("model.kind='matcher' needs data.embedder: the trained run whose frozen "
                        "model embeds the queries and passages")
    k = int(config.model.n_ctx) - 1
    embedder = search_index.open_embedder(source)
    if embedder.embedder.dim != int(config.model.d_model):
        raise UserError(f"model.d_model={config.model.d_model} must equal the width of the "
                        f"embeddings of {source} ({embedder.embedder.dim})")
    train, held, stats = load_pairs(config)
    check_pool(k, len(train), len(held), int(config.train.batch_size))
    key = cache_key(embedder, train, held)
    path = cache_path(config, workdir)
    emb = read_cache(path, key)
    cached = emb is not None
    if emb is None:
        emb = embed_pairs(embedder, train, held, log)
    stats = dict(stats, train_pairs=len(train), held_out_pairs=len(held), pool=k,
                 embedder=embedder.description, embedder_fingerprint=embedder.fingerprint,
                 embedding_cache=path or None)
    return emb, embedder, stats, cached


def build_data(config, tokenizer_path: str | None = None, process_index: int = 0,
               process_count: int = 1, *, tokenizer=None) -> DataBundle:
    """The trainer's data for kind 'matcher' (the signature of ``pipeline.build_data``): the
    pools of the cached pair embeddings; the embedder's tokenizer is the run's (written to
    ``tokenizer_path``, with the cache, after every check has passed)."""
    del tokenizer  # the matcher reads embeddings; the tokenizer is the embedder's
    batch = int(config.train.batch_size)
    if batch % process_count:
        raise UserError(f"train.batch_size {batch} must be a multiple of the process count "
                        f"{process_count}")
    workdir = os.path.dirname(tokenizer_path) if tokenizer_path else None
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if process_index == 0 else (lambda m: None)
    emb, embedder, stats, cached = pair_embeddings(config, workdir, log)
    k, per_process = int(config.model.n_ctx) - 1, batch // process_count
    train_iter = train_iterator(emb, k, per_process, int(config.seed), process_index)
    evals = eval_batches(emb, k, per_process, int(config.train.eval_batches) * per_process,
                         int(config.seed))
    if process_index == 0:
        if not cached and stats["embedding_cache"]:
            write_cache(stats["embedding_cache"], emb)
        if tokenizer_path and not os.path.isfile(tokenizer_path):
            embedder.tokenizer.save(tokenizer_path)
    stats.update(eval_batches=len(evals), per_process_batch=per_process,
                 embedding_cache_hit=cached, vocab_size=embedder.tokenizer.vocab_size)
    return DataBundle(embedder.tokenizer, train_iter, evals, stats, tokenizer_path, False)


def evaluation_batches(config, workdir: str, batch: int, max_queries: int = 0
                       ) -> tuple[list[dict[str, np.ndarray]], dict]:
    """``evaluate``'s batches for a trained matcher: one pool per held-out query (the first
    ``max_queries``; 0: all), from the run's embedding cache when it matches (read only; otherwise
    the pairs are embedded again in memory), and their description."""
    emb, _, stats, cached = pair_embeddings(
        config, workdir, lambda msg: print(msg, file=sys.stderr, flush=True))
    k = int(config.model.n_ctx) - 1
    max_queries = max_queries or int(config.retrieval.get("eval_queries", 0) or 0)
    batches = eval_batches(emb, k, batch, max_queries, int(config.seed))
    queries = sum(int(b["weight"].sum()) for b in batches)
    info = {"source": f"held-out pairs of {stats.get('source', config.retrieval.pairs)}",
            "packing": f"pools of {k} candidates", "row_length": k + 1, "rows": queries,
            "pool": k, "embedder": stats["embedder"], "embedding_cache_hit": cached}
    return batches, info
