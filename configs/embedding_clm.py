"""Embedding-augmented ("oracle") causal LMs: an encoder reads the whole sequence into one small
vector, a causal decoder predicts next tokens with it (docs/embedding_lms.md,
docs/metrics.md#stored-embedding-accounting).

    python -m mixers_jax.train --config=configs/embedding_clm.py:cpu

The decoder sees the compressed embedding (injection 'token': one extra leading position;
'embedding': concatenated to every token embedding; 'add': added to every token embedding). Because
the embedding must be stored to reproduce the text, the trainer logs the compression accounting
beside the decoder loss: loss offset L_o = n_p·b_p·ln2 / n_ctx (nats/token), normalized loss,
embedding bits per byte and total bits per byte, with n_p = encoder width / compression stored
numbers at model.embed_bits bits each. Presets:

* smoke: seconds, for tests.
* cpu: mixer encoder d128 L2 with a 64-number embedding (compression 2), mixer decoder d256 L4,
  n128, V2048 — the decoder of mixer_clm.py:cpu, so the two runs compare directly.
  cpu_transformer: the same with transformer encoder and decoder.
* cpu_small, cpu_small_transformer: the same pair on the decoder of mixer_clm.py:cpu_small /
  transformer_clm.py:cpu_small (d128, V1024, 800 steps), the results page's rows
  (docs/results.md); a few minutes each on 2 cores.
* cpu_entropy_weighted (smoke_entropy_weighted): the cpu (smoke) model trained with the
  entropy-weighted CLM objective (each target weighted by 1 − the normalized occlusion attribution
  of the memory, docs/analysis.md#entropy-weighted-clm), evaluated with the plain clm.
* paper_transformer: the entropy-estimation model (transformer encoder d256 L16 H4, c = 4 -> 64
  numbers, transformer decoder d512 L16, n1024, V8000, 4 bits per number in the accounting).
* paper_mixer: mixer encoder d256 -> 64 numbers, mixer decoder d1024 L16, n1024.
Variants: --config.model.injection=embedding|add, --config.model.embed_quant=float8_e4m3fn,
--config.model.qat_noise=0.0625 (noise-injection QAT), --config.model.compression=4.
"""
from mixers_jax.config import CPU, CPU_SMALL, CPU_SMALL_LR, PAPER, SMOKE, family_config

# The CPU encoder: d128 L2, compression 2 -> a 64-number embedding.
_CPU_ENCODER = {"model.encoder.d_model": 128, "model.encoder.n_layers": 2, "model.compression": 2,
                "model.n_heads": 4}
_CPU = dict(CPU, **_CPU_ENCODER)
# The results page's pair (docs/results.md): the decoder of mixer_clm.py:cpu_small (d128 L4 n128
# V1024, 800 steps) reading the same 64-number embedding.
_CPU_SMALL = dict(CPU_SMALL, **_CPU_ENCODER)


# Entropy-weighted CLM (docs/analysis.md#entropy-weighted-clm): each target weighted by 1 − the
# normalized occlusion attribution of the model's own memory; evaluated as the plain clm.
_ENTROPY_WEIGHTED = {"train.objective": "entropy_weighted_clm", "train.eval_objectives": ("clm",)}


def _paper(kind, lr, batch, d_dec, extra=()):
    return {
        **PAPER, "model.encoder.kind": kind, "model.decoder.kind": kind,
        "model.encoder.d_model": 256, "model.encoder.n_layers": 16, "model.compression": 4,
        "model.embed_bits": 4, "model.n_ctx": 1024, "model.d_model": d_dec, "model.n_layers": 16,
        "model.n_heads": 4, "model.vocab_size": 8000, "train.batch_size": batch, "train.lr": lr,
        **dict(extra),
    }


PRESETS_DICT = {
    "smoke": dict(SMOKE, **{"model.n_heads": 2, "model.encoder.d_model": 16,
                            "model.compression": 2}),
    "cpu": _CPU,
    "cpu_transformer": dict(_CPU, **{"model.encoder.kind": "transformer",
                                     "model.decoder.kind": "transformer", "train.lr": 5e-4}),
    "cpu_small": dict(_CPU_SMALL, **{"train.lr": CPU_SMALL_LR["mixer"]}),
    "cpu_small_transformer": dict(_CPU_SMALL, **{"model.encoder.kind": "transformer",
                                                 "model.decoder.kind": "transformer",
                                                 "train.lr": CPU_SMALL_LR["transformer"]}),
    "smoke_entropy_weighted": dict(SMOKE, **{"model.n_heads": 2, "model.encoder.d_model": 16,
                                             "model.compression": 2, **_ENTROPY_WEIGHTED}),
    "cpu_entropy_weighted": dict(_CPU, **_ENTROPY_WEIGHTED),
    "paper_transformer": _paper("transformer", 2e-4, 64, 512),
    "paper_mixer": _paper("mixer", 5e-4, 64, 1024),
}
PRESETS = tuple(PRESETS_DICT)


def get_config(arg=None):
    return family_config("embedding_clm", PRESETS_DICT, arg,
                         {"model.kind": "embedding_clm", "model.injection": "token"})
