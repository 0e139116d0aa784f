"""Information-retention probes: how much of its input does a trained encoder keep in one vector?
(docs/metrics.md#information-retention-probe, docs/published_results.md#information-retention.)

    python -m mixers_jax.train --config=configs/information.py:cpu \
        --config.train.init_from=/tmp/cpu_mixer --workdir=/tmp/probe_cpu_mixer

The encoder (a causal LM, an autoencoder's or a memory model's encoder, from the workdir in
train.init_from) is loaded and frozen ('encoder' is in train.frozen; by default it gets a fresh
trainable token embedding, docs/objectives.md#frozen-encoders —
set train.frozen_encoder_embedding=pretrained_frozen to
keep its own); a fresh decoder learns to reconstruct all n tokens from the single embedding at
encoder.position (−2 for causal LMs, whose last position is untrained). The final table reports the
eval CE H, the token accuracy and the information ratio I_e = 1 − H/9.03 (and 1 − H/ln V).
Without train.init_from the frozen encoder is the untrained (random) control
(docs/published_results.md#information-retention).

Presets (the encoder fields must match the loaded model; a mismatch is a one-line error):
* smoke: seconds, for tests (encoder = mixer_clm.py:smoke).
* cpu: encoder = mixer_clm.py:cpu (d256 L4 n128 V2048), mixer decoder d256 L2.
  cpu_transformer: encoder = transformer_clm.py:cpu.
* cpu_small, cpu_small_transformer: encoders = mixer_clm.py:cpu_small / transformer_clm.py:cpu_small
  (d128 V1024; the results page's probes, docs/results.md), decoder d128 L2 (mixer decoder at
  lr 4e-3 as in cpu_recon, transformer decoder at 5e-4 as in cpu_transformer).
* cpu_autoencoder: encoder = autoencoder.py:cpu (n64, position −1). cpu_recon: encoder = autoencoder.py:cpu_recon (n32 V512,
  4 mixing heads; the decoder as well, unroll, lr 4e-3):
      python -m mixers_jax.train --config=configs/information.py:cpu_recon \
          --config.train.init_from=runs/recon_mixer --workdir=runs/probe_recon
  reaches H 0.809, token accuracy 77.0% in 600 steps; without init_from (the untrained control)
  4.916, 7.9%.
* paper_mixer: decoder d1024 L8, n512, lr 5e-4, 200k steps, batch 128
  (docs/metrics.md#information-retention-probe);
  paper_transformer: decoder d512 L8, lr 2e-4.
"""
from mixers_jax.config import CPU, CPU_SMALL, PAPER, SMOKE, family_config

_PROBE = {"train.frozen": "encoder", "model.encoder.position": -2}
_CPU = dict(CPU, **_PROBE, **{"model.encoder.n_layers": 4, "model.n_layers": 2,
                              "train.steps": 600, "train.warmup_steps": 50, "train.eval_every": 200,
                              "train.checkpoint_every": 300, "model.n_heads": 4})

# Encoders of mixer_clm.py:cpu_small / transformer_clm.py:cpu_small (d128 L4 n128 V1024), a decoder
# of the same width.
_CPU_SMALL = dict(_CPU, **{k: CPU_SMALL[k] for k in ("model.d_model", "model.vocab_size",
                                                     "data.tokenizer_max_chars")},
                  **{"train.lr": 4e-3})


def _paper(kind, d, lr):
    return {
        **_PROBE, **PAPER, "model.encoder.kind": kind, "model.decoder.kind": kind,
        "model.n_ctx": 512, "model.d_model": d, "model.n_layers": 8, "model.vocab_size": 8000,
        "model.n_heads": 4, "model.expansion": "unroll" if kind == "transformer" else "repeat",
        "model.encoder.position": -2 if kind == "mixer" else -1, "train.batch_size": 128,
        "train.lr": lr,
    }


PRESETS_DICT = {
    "smoke": dict(SMOKE, **_PROBE, **{"model.n_heads": 2}),
    "cpu": _CPU,
    "cpu_transformer": dict(_CPU, **{"model.encoder.kind": "transformer",
                                     "model.encoder.position": -1, "model.decoder.kind": "transformer",
                                     "model.expansion": "unroll", "train.lr": 5e-4}),
    "cpu_small": _CPU_SMALL,
    "cpu_small_transformer": dict(_CPU_SMALL, **{"model.encoder.kind": "transformer",
                                                 "model.encoder.position": -1,
                                                 "model.decoder.kind": "transformer",
                                                 "model.expansion": "unroll", "train.lr": 5e-4}),
    "cpu_autoencoder": dict(_CPU, **{"model.n_ctx": 64, "model.encoder.n_layers": 2,
                                     "model.encoder.position": -1, "model.n_heads": 8}),
    "cpu_recon": dict(_CPU, **{"model.n_ctx": 32, "model.vocab_size": 512, "model.encoder.n_layers": 2,
                               "model.encoder.position": -1, "model.n_heads": 8, "model.heads": 4,
                               "model.expansion": "unroll", "train.lr": 4e-3}),
    "paper_mixer": _paper("mixer", 1024, 5e-4),
    "paper_transformer": _paper("transformer", 512, 2e-4),
}
PRESETS = tuple(PRESETS_DICT)


def get_config(arg=None):
    return family_config("information", PRESETS_DICT, arg,
                         {"model.kind": "autoencoder", "train.objective": "autoencode"})
