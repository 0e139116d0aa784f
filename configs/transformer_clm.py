"""Llama-style transformer baseline (docs/transformer_baseline.md): RMSNorm, RoPE, SwiGLU, causal attention.

    python -m mixers_jax.train --config=configs/transformer_clm.py:cpu

Presets as in configs/mixer_clm.py, with the transformer's published sizes: tinystories (d512 L8 H4,
lr 2e-4, batch 32), fineweb (d512 L16 H4 — the baseline the blog compares with a d1024 mixer).
"""
from mixers_jax.config import clm_config, clm_presets

PRESETS = tuple(clm_presets("transformer"))


def get_config(arg=None):
    return clm_config("transformer", "transformer_clm", arg)
