"""Mixer and transformer autoencoders: a whole context -> one vector -> the context (docs/autoencoders.md).

    python -m mixers_jax.train --config=configs/autoencoder.py:cpu

The encoder's embedding at position encoder.position passes the bottleneck (compression c) and is
expanded to n decoder inputs ('repeat' or the cyclic 'unroll' window); the loss is the unshifted
reconstruction CE (objective 'autoencode'). Presets:

* smoke: seconds, for tests.
* cpu: mixer/mixer, d256, 2+2 layers, n64, V2048 on the embedded corpus (minutes on 2 cores).
  cpu_transformer (transformer/transformer, 8 heads, unrolled: the stronger transformer AE of
  docs/autoencoders.md#encoder-and-decoder-choices),
  cpu_unmasked (the mixer with an unmasked encoder), cpu_mixer_transformer and
  cpu_transformer_mixer (the hybrids; the transformer half runs at half the mixer's width) are the
  same budget for side-by-side comparisons (README "Autoencoders"). cpu_memory_encoder: d128
  n16 V384, 4 heads, k4: the encoder shape of memory.py:cpu, for its curriculum (stage 1 loads it frozen).
* cpu_recon: the reconstruction preset (docs/autoencoders.md#cpu-reconstruction-presets): mixer/mixer,
  d256, 2+2 layers, n32, V512, 4 mixing heads, unroll, lr 4e-3, 1000 steps of 32 windows.
      python -m mixers_jax.train --config=configs/autoencoder.py:cpu_recon --workdir=runs/recon_mixer
  reaches eval loss 0.576 and token accuracy 83.2% on held-out windows (4 min 20 s, 0.23 s/step on
  2 shared cores at load 3-7; 0.66 s/step at load 6-14). The same budget (--workdir=runs/recon_<name>;
  figures at load 6-14): cpu_recon_transformer (8 heads, unroll, lr 5e-4, the best of
  2.5e-4 / 5e-4 / 1e-3 / 2e-3): 3.695, 19.5% (6 min 50 s, 0.39 s/step at load 3-7); cpu_recon_unmasked (unmasked encoder): 0.722, 79.2%;
  cpu_recon_both_unmasked (unmasked encoder and decoder): 0.549, 83.9%;
  cpu_recon_mixer_transformer (mixer encoder, transformer decoder d128): 3.693, 16.1%;
  cpu_recon_transformer_mixer (transformer encoder d128, mixer decoder): 2.485, 36.2%.
* tinystories / tinystories_transformer: d512 L8+8 n512 V4096
  (docs/published_results.md#autoencoders: 4.53/4.35 vs
  5.31/5.23); fineweb: the best mixer recipe d1024 k8 L8+8 n512 repeat bf16 (≈1.5 on FineWeb);
  fineweb_transformer: d512 L8+8 H8 unrolled. Give the data with --config.data.source=...
Variants: --config.model.expansion=unroll, --config.model.compression=4, --config.model.heads=4,
--config.model.encoder.causal=False, --config.model.decoder.kind=transformer, ...
"""
from mixers_jax.config import CPU, PAPER, SMOKE, family_config

_CPU_AE = dict(CPU, **{
    "model.n_ctx": 64, "model.n_layers": 2, "model.n_heads": 8, "train.batch_size": 32,
    "train.steps": 800, "train.warmup_steps": 50, "train.eval_every": 200, "train.checkpoint_every": 400,
})
# The reconstruction presets: 32-token windows, V512, 4 mixing heads, unrolled expansion, lr 4e-3,
# 1000 steps of 32 windows (docs/autoencoders.md#cpu-reconstruction-presets).
_RECON = dict(_CPU_AE, **{
    "model.n_ctx": 32, "model.vocab_size": 512, "model.heads": 4, "model.expansion": "unroll",
    "train.lr": 4e-3, "train.steps": 1000, "train.eval_every": 250, "train.checkpoint_every": 500,
})
_TRANSFORMER = {"model.encoder.kind": "transformer", "model.decoder.kind": "transformer",
                "model.expansion": "unroll", "train.lr": 5e-4}


def _paper(d, layers, vocab, lr, batch, extra=()):
    return {**PAPER, "model.n_ctx": 512, "model.d_model": d, "model.n_layers": layers,
            "model.vocab_size": vocab, "train.batch_size": batch, "train.lr": lr, **dict(extra)}


PRESETS_DICT = {
    "smoke": dict(SMOKE, **{"model.n_heads": 2}),
    "cpu": _CPU_AE,
    "cpu_transformer": dict(_CPU_AE, **_TRANSFORMER),
    "cpu_unmasked": dict(_CPU_AE, **{"model.encoder.causal": False}),
    "cpu_mixer_transformer": dict(_CPU_AE, **{
        "model.decoder.kind": "transformer", "model.decoder.d_model": 128}),
    "cpu_transformer_mixer": dict(_CPU_AE, **{
        "model.encoder.kind": "transformer", "model.encoder.d_model": 128}),
    "cpu_recon": _RECON,
    "cpu_recon_transformer": dict(_RECON, **_TRANSFORMER),
    "cpu_recon_unmasked": dict(_RECON, **{"model.encoder.causal": False}),
    "cpu_recon_both_unmasked": dict(_RECON, **{"model.encoder.causal": False,
                                               "model.decoder.causal": False}),
    "cpu_recon_mixer_transformer": dict(_RECON, **{
        "model.decoder.kind": "transformer", "model.decoder.d_model": 128}),
    "cpu_recon_transformer_mixer": dict(_RECON, **{
        "model.encoder.kind": "transformer", "model.encoder.d_model": 128}),
    "cpu_memory_encoder": dict(_CPU_AE, **{
        "model.n_ctx": 16, "model.d_model": 128, "model.vocab_size": 384, "model.heads": 4,
        "model.kernel": 4, "train.lr": 4e-3}),
    "tinystories": _paper(512, 8, 4096, 1e-4, 32),
    "tinystories_transformer": _paper(512, 8, 4096, 1e-4, 32,
                                      dict(_TRANSFORMER, **{"model.n_heads": 8, "train.lr": 1e-4})),
    "fineweb": _paper(1024, 8, 8000, 5e-4, 128, {"model.kernel": 8}),
    "fineweb_transformer": _paper(512, 8, 8000, 2e-4, 128,
                                  dict(_TRANSFORMER, **{"model.n_heads": 8, "train.lr": 2e-4})),
}
PRESETS = tuple(PRESETS_DICT)


def get_config(arg=None):
    return family_config("autoencoder", PRESETS_DICT, arg,
                         {"model.kind": "autoencoder", "train.objective": "autoencode"})
