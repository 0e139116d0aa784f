"""Direct embedding matching (docs/search.md#direct-embedding-matching): a frozen generative model
embeds each query and its candidate passages; an unmasked mixer with no token embedding reads
[query, c_1 ... c_K] and scores each candidate (a Linear(d -> 1) head); cross-entropy over the K
candidate positions, candidates in random order.

    python -m mixers_jax.train --config=configs/matcher.py:cpu \
        --config.data.embedder=runs/mixer_cpu --workdir=runs/matcher_cpu

``data.embedder`` names the trained run whose model embeds the pairs (``retrieval.pairs``: the
built-in docstring summaries by default, or JSONL / Parquet pairs; the held-out split as in
configs/retrieval.py). Its embeddings are computed once and cached (``data.embedding_cache``,
default ``<workdir>/embedding_cache.npz``); ``model.d_model`` must equal the embedder's width. The
pool is K = model.n_ctx − 1 candidates. The final table reports ``match`` (the matcher: CE and
top-1 ``accuracy`` over K, ``targets`` = held-out queries) and ``match_cosine`` (the frozen
embeddings' cosine similarity on the very same pools, no training).

Presets:
* smoke: seconds, for tests (d32 matcher over pools of 8; the embedder must be 32 wide).
* cpu: pools of 32 candidates (n_ctx 33) over the embeddings of a d256 ``mixer_clm.py:cpu`` run,
  the built-in pairs, a d256 L2 matcher, 400 steps of 32 queries (about 5 minutes on 2 busy cores,
  after embedding the ~6,000 texts once: about 4 minutes).
  cpu_pool128: pools of 128.
* pool32, pool128, pool512, pool1024: the published sequence lengths K + 1 ∈ {32, 128, 512, 1024}
  (31 ... 1023 candidates), d1024 matcher (the width of a d1024 embedder) with 8 blocks, lr 1e-4,
  batch 32; the published matcher's depth is not stated, 8 is this project's choice.
"""
from mixers_jax.config import SMOKE, family_config

_MATCHER = {"model.kind": "matcher", "model.causal": False, "train.objective": "match",
            "train.eval_objectives": ("match", "match_cosine")}
_CPU = {
    "model.n_ctx": 33, "model.d_model": 256, "model.n_layers": 2, "train.steps": 400,
    "train.batch_size": 32, "train.warmup_steps": 40, "train.lr": 5e-4, "train.log_every": 50,
    "train.eval_every": 200, "train.eval_batches": 16, "train.checkpoint_every": 200,
}


def _paper(length: int) -> dict:
    return {"model.n_ctx": length, "model.d_model": 1024, "model.n_layers": 8,
            "model.dtype": "bfloat16", "train.steps": 50_000, "train.batch_size": 32,
            "train.warmup_steps": 500, "train.lr": 1e-4, "train.log_every": 100,
            "train.eval_every": 5000, "train.eval_batches": 50, "train.checkpoint_every": 5000}


PRESETS_BY_NAME = {
    "smoke": dict(SMOKE, **{"model.n_ctx": 9, "train.batch_size": 8, "retrieval.max_pairs": 200}),
    "cpu": _CPU,
    "cpu_pool128": dict(_CPU, **{"model.n_ctx": 129}),
    **{f"pool{n}": _paper(n) for n in (32, 128, 512, 1024)},
}
PRESETS = tuple(PRESETS_BY_NAME)


def get_config(arg=None):
    return family_config("matcher", PRESETS_BY_NAME, arg, _MATCHER, default="cpu")
