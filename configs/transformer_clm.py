"""Llama-style transformer baseline (docs/transformer_baseline.md): RMSNorm, RoPE, SwiGLU, causal attention.

    python -m mixers_jax.train --config=configs/transformer_clm.py:cpu

Presets as in configs/mixer_clm.py (cpu_small at lr 1.5e-3, the better of two in 300-step
trials), with the transformer's published sizes: tinystories (d512 L8 H4,
lr 2e-4, batch 32), fineweb (d512 L16 H4 — the baseline the blog compares with a d1024 mixer).
The original-GPT baseline (``model.transformer='gpt'``: learned positions, LayerNorm, GELU MLP,
biases; docs/transformer_baseline.md#original-gpt-baseline): gpt_tinystories (d512 L8 H4 n512, the
published comparison's shape, tinystories schedule), gpt_smoke (the smoke sizes).
"""
from mixers_jax.config import clm_presets, family_config

_LLAMA = clm_presets("transformer")
_GPT = {"model.transformer": "gpt"}
PRESETS_BY_NAME = {
    **_LLAMA,
    "gpt_smoke": {**_LLAMA["smoke"], **_GPT},
    "gpt_tinystories": {**_LLAMA["tinystories"], **_GPT},
}
PRESETS = tuple(PRESETS_BY_NAME)


def get_config(arg=None):
    return family_config("transformer_clm", PRESETS_BY_NAME, arg,
                         {"model.kind": "transformer", "train.lr": 2e-4})
