"""InfoNCE retrieval tuning of a trained causal LM (docs/retrieval.md).

    python -m mixers_jax.train --config=configs/retrieval.py:cpu \
        --config.train.init_from=runs/mixer_cpu --workdir=runs/retrieval_mixer
    python -m mixers_jax.train --config=configs/retrieval.py:cpu_transformer \
        --config.train.init_from=runs/transformer_cpu --workdir=runs/retrieval_transformer

The model (and its tokenizer) is loaded from ``train.init_from`` (a trained ``configs/mixer_clm.py`` /
``transformer_clm.py`` run of the same preset size) and tuned with the InfoNCE objective on
(query, passage) pairs: the built-in pairs (docstring summary -> the rest of the docstring, pydoc
topic heading -> its text; ``--config.retrieval.pairs=FILES`` for your own JSONL / Parquet pairs).
Cosine similarity of the final hidden states at position -2 (mixers) / -1 (transformers), τ = 0.02,
batches of 32 pairs: each query against its passage and the 31 others. The run ends with top-1
accuracy over pools of 32 ... 1024 held-out passages, next to BM25 on the same pools.

Presets: smoke / smoke_transformer (seconds, random init, for tests), cpu / cpu_transformer (a few
minutes on 2 cores, the sizes of the clm ``cpu`` presets), published / published_transformer (the
published FineMath retrieval models: mixer d1024 L16 n512, transformer d512 L16 H4; lr 1e-4, warmup
50, batch 32, one epoch of your pairs: set train.steps to pairs/32).
"""
from mixers_jax.config import CPU, SMOKE, family_config

_TUNE = {
    "train.objective": "infonce", "data.packing": "pad",
    "retrieval.pairs": "builtin", "retrieval.temperature": 0.02, "retrieval.candidates": 32,
    "train.batch_size": 32,
}
_SMOKE = {
    **{k: v for k, v in SMOKE.items() if not k.startswith("data.")},
    "data.tokenizer_max_chars": 300_000, "model.n_heads": 2, "train.batch_size": 8,
    "retrieval.candidates": 8, "retrieval.max_pairs": 400, "retrieval.held_out_fraction": 0.2,
    "retrieval.pool_sizes": (8, 16), "train.steps": 4, "train.eval_every": 4,
    "train.checkpoint_every": 4,
}
_CPU = {
    **{k: v for k, v in CPU.items() if not k.startswith("data.") and k != "train.batch_size"},
    "model.n_heads": 4, "train.steps": 300, "train.warmup_steps": 30, "train.lr": 1e-4,
    "train.log_every": 25, "train.eval_every": 150, "train.checkpoint_every": 150,
    "train.eval_batches": 8, "train.init_map": ".=.",
}
_PUBLISHED = {
    "model.n_ctx": 512, "model.vocab_size": 8000, "model.n_heads": 4, "model.dtype": "bfloat16",
    "train.lr": 1e-4, "train.warmup_steps": 50, "train.steps": 45_000, "train.log_every": 100,
    "train.eval_every": 5000, "train.checkpoint_every": 5000, "train.eval_batches": 50,
    "data.padding": "left", "train.init_map": ".=.",
}
PRESETS = {
    "smoke": {**_SMOKE},
    "smoke_transformer": {**_SMOKE, "model.kind": "transformer"},
    "cpu": {**_CPU},
    "cpu_transformer": {**_CPU, "model.kind": "transformer"},
    "published": {**_PUBLISHED, "model.d_model": 1024, "model.n_layers": 16},
    "published_transformer": {**_PUBLISHED, "model.kind": "transformer", "model.d_model": 512,
                              "model.n_layers": 16},
}


def get_config(arg=None):
    return family_config("retrieval", PRESETS, arg, _TUNE, default="cpu")
