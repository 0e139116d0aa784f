"""Flexibility ablations (docs/ablations.md): masked mixer and transformer causal LMs with and without
their MLPs, norms and residual connections, all on the same data with the same budget.

    python -m mixers_jax.train --config=configs/ablations.py:transformer_no_norms --workdir=runs/abl_t_no_norms

Presets: ``mixer`` and ``transformer`` (the two baselines; no preset = ``mixer``), and one per
switch: ``mixer_no_mlp``, ``mixer_no_norms``, ``mixer_no_residuals``, ``transformer_no_mlp``,
``transformer_no_norms``, ``transformer_no_residuals``, ``transformer_mlp_attention`` (a second
attention in the MLP's place). Every run is d64 L4 n64 V512, 200 steps of 16 rows at lr 2e-3
(the same for both kinds, so that only the architecture differs), on the first 600 documents of the
embedded corpus; 1 to 8 minutes each on the shared 2-core machine (README, "Ablations"). ``train.on_divergence='record'``: a run whose
loss becomes non-finite ends normally with "diverged at step N" as its result.
"""
from mixers_jax.config import family_config

_BUDGET = {
    "model.n_ctx": 64, "model.d_model": 64, "model.n_layers": 4, "model.vocab_size": 512,
    "model.n_heads": 4,
    "train.steps": 200, "train.batch_size": 16, "train.warmup_steps": 20, "train.lr": 2e-3,
    "train.log_every": 25, "train.eval_every": 100, "train.eval_batches": 8,
    "train.checkpoint_every": 100, "train.keep_checkpoints": 1, "train.on_divergence": "record",
    "data.max_documents": 600, "data.tokenizer_max_chars": 600_000,
}
_SWITCHES = {
    "no_mlp": {"model.mlp": "none"},
    "no_norms": {"model.layer_norm": False},
    "no_residuals": {"model.residual": False},
}
_BASELINES = {kind: {**_BUDGET, "model.kind": kind} for kind in ("mixer", "transformer")}
PRESETS = {
    **_BASELINES,
    **{f"{kind}_{name}": {**base, **switch} for kind, base in _BASELINES.items()
       for name, switch in _SWITCHES.items()},
    "transformer_mlp_attention": {**_BASELINES["transformer"], "model.mlp": "attention"},
}


def get_config(arg=None):
    return family_config("ablations", PRESETS, arg, default="mixer")
