"""Model variants on the causal-LM budget of ``configs/mixer_clm.py:cpu`` (same data, sizes, steps,
batch; docs/transformer_baseline.md#hybrids).

    python -m mixers_jax.train --config=configs/variants.py:transfixer --workdir=runs/transfixer

Presets: ``transfixer`` (no preset = this one): the Llama-style transformer with a flat masked
mixer in series with attention in every block; ``parallel_hybrid``: the mixer beside attention
(both hybrids with ``model.hybrid_mix_init='zero'``, the mixing a zero residual branch at
initialisation, docs/transformer_baseline.md#hybrid-initialisation: with the mixer's own init they
stay on the unigram plateau at small budgets; ``--config.model.hybrid_mix_init=mixer`` restores it; at the
ablation budget run for 1000 steps, README "Transformer-mixer hybrids", the zero-init
transfixer / parallel hybrid reach eval loss 2.7803 / 2.7383 at lr 2e-3 against the transformer's
2.7390 at 5e-3 and the flat mixer's 2.7859 at 1e-2);
``bidirectional``: the bidirectional flat mixer (``model.bidirectional``,
docs/masked_mixers.md#bidirectional-mixer) on ``mixer_clm.py:cpu``; ``linear``: the fully linear mixer, one block of flat mixing with no norm and no MLP
(embedding -> x + Mix(x) -> head: affine in the embedding); ``mtp``: the flat masked mixer (``mixer_clm.py:cpu`` itself) trained with multi-token prediction
(objective ``mtp``, docs/objectives.md#mtp); the mixer block variants of
docs/masked_mixers.md#other-block-variants on ``mixer_clm.py:cpu``: ``parallel_mixers`` (two
token mixings per block, each with its own norm, summed; ``model.parallel_mixers=2``),
``softmax_mixer`` (softmax over the features of the mixing output), ``position_channel`` (the
last feature holds the position, re-inserted before every block); ``smoke_transfixer``,
``smoke_parallel_hybrid``, ``smoke_bidirectional``, ``smoke_linear``, ``smoke_mtp``,
``smoke_parallel_mixers``, ``smoke_softmax_mixer``, ``smoke_position_channel``: the same at the
smoke size (seconds, tests). At the ablation budget (README, "Transformer-mixer hybrids") the
three block variants reach eval loss 3.9671 (P = 2; 4.0322 with P = 4) / 3.8569 / 4.1188
against the flat mixer's 3.9248. The
transformers run at the transformer baseline's learning rate on this budget (5e-4, as
``configs/transformer_clm.py:cpu``), so the comparison with the baselines is
``configs/transformer_clm.py:cpu`` and ``configs/mixer_clm.py:cpu`` (README, "Transformer-mixer
hybrids").
"""
from mixers_jax.config import CPU, SMOKE, family_config

_TRANSFORMER = {"model.kind": "transformer", "model.n_heads": 4}
_HYBRIDS = {name: {"model.hybrid": h, "model.hybrid_mix_init": "zero"}
            for name, h in (("transfixer", "series"), ("parallel_hybrid", "parallel"))}
# The fully linear mixer (docs/masked_mixers.md#fully-linear-mixer): no nonlinearity, no norm.
_LINEAR = {"model.n_layers": 1, "model.mlp": "none", "model.layer_norm": False}
# Mixer block variants (docs/masked_mixers.md#other-block-variants).
_BLOCK_VARIANTS = {"parallel_mixers": {"model.parallel_mixers": 2},
                   "softmax_mixer": {"model.softmax_mixer": True},
                   "position_channel": {"model.position_channel": True}}
PRESETS = {
    **{name: {**CPU, **_TRANSFORMER, "train.lr": 5e-4, **h} for name, h in _HYBRIDS.items()},
    **{f"smoke_{name}": {**SMOKE, **_TRANSFORMER, "model.n_heads": 2, **h}
       for name, h in _HYBRIDS.items()},
    "bidirectional": {**CPU, "model.kind": "mixer", "model.bidirectional": True},
    "smoke_bidirectional": {**SMOKE, "model.kind": "mixer", "model.bidirectional": True},
    **{name: {**base, "model.kind": "mixer", **_LINEAR}
       for name, base in (("linear", CPU), ("smoke_linear", SMOKE))},
    "mtp": {**CPU, "model.kind": "mixer", "train.objective": "mtp"},
    **{prefix + name: {**base, "model.kind": "mixer", **v} for name, v in _BLOCK_VARIANTS.items()
       for prefix, base in (("", CPU), ("smoke_", SMOKE))},
    "smoke_mtp": {**SMOKE, "model.kind": "mixer", "train.objective": "mtp"},
}


def get_config(arg=None):
    return family_config("variants", PRESETS, arg, default="transfixer")
