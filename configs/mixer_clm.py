"""Masked-mixer causal language model (docs/masked_mixers.md).

    python -m mixers_jax.train --config=configs/mixer_clm.py:cpu

Presets: smoke (seconds), cpu (under 10 minutes on 2 cores, embedded corpus; validation bits per
byte well below gzip -9 on the same text — see the README's results table), cpu_small (d128 L4
n128 V1024, 800 steps at lr 8e-3, the results page's causal LMs, docs/results.md: held-out loss
3.296 nats, 2.053 bits per byte in 5 min 37 s on a shared 2-core machine), tinystories (d512 L8
n512 V4096, unpacked rows), fineweb (d1024 L16 n512 V8000), gpu_mfu (d1024 L16 n1024 bf16).
Variants: --config.model.heads=4, --config.model.mixing=toeplitz, --config.model.expanded=True, ...
"""
from mixers_jax.config import clm_config, clm_presets

PRESETS = tuple(clm_presets("mixer"))


def get_config(arg=None):
    return clm_config("mixer", "mixer_clm", arg)
