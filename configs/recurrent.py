"""Structured recurrent mixers (SRM, docs/recurrent_mixers.md): mixed column-/row-repeat heads
with a learnable
decay clipped to [0.9, 1], FFN-first SiLU blocks, Kaiming init; generation in O(d) state per layer.

    python -m mixers_jax.train --config=configs/recurrent.py:cpu --workdir=/tmp/cpu_srm
    python -m mixers_jax.generate --workdir=/tmp/cpu_srm --prompt="The" --mode=recurrent

Presets:
* smoke: seconds, for tests.
* cpu: minutes on 2 cores on the embedded corpus (d256 L4 H4 mixed, n128), like mixer_clm:cpu.
* fineweb_n512: the published pretraining model, d1024 L16 H4 mixed, decay and projections on,
  n512, global batch 128, lr 5e-4, warmup 50, 200k steps (FineMath-4+ in the paper; give the data
  with --config.data.source=...).
* fineweb_n1024: the n1024 version (global batch 64) used for the inference comparison.
Variants: --config.model.mixing=row|col, --config.model.decay=False, --config.model.block=mixer.
"""
from mixers_jax.config import CPU, PAPER, SMOKE, family_config

_PUBLISHED = {
    **PAPER, "model.d_model": 1024, "model.n_layers": 16, "model.heads": 4,
    "model.vocab_size": 8000, "train.lr": 5e-4, "train.warmup_steps": 50,
}

PRESETS_DICT = {
    "smoke": dict(SMOKE, **{"model.heads": 2}),
    "cpu": dict(CPU, **{"model.heads": 4, "train.warmup_steps": 50}),
    "fineweb_n512": dict(_PUBLISHED, **{"model.n_ctx": 512, "train.batch_size": 128}),
    "fineweb_n1024": dict(_PUBLISHED, **{"model.n_ctx": 1024, "train.batch_size": 64}),
}
PRESETS = tuple(PRESETS_DICT)


def get_config(arg=None):
    return family_config("recurrent", PRESETS_DICT, arg, {
        "model.kind": "mixer", "model.mixing": "mixed", "model.heads": 4, "model.block": "srm",
        "model.decay": True, "train.lr": 5e-4, "train.warmup_steps": 50,
    })
