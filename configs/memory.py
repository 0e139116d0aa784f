"""Chunked memory models: the main job of mixers_jax (docs/memory_models.md).

    python -m mixers_jax.train --config=configs/memory.py

Each row holds s = model.chunks chunks of n_ctx tokens. Every chunk but the last is encoded, in
parallel, into one memory vector; the decoder for chunk c reads the memories of chunks < c in fixed
slots, then chunk c's tokens, under the causal mask. With no argument this trains a memory mixer on
the embedded corpus with the combined objective (next-token loss + blank copy with a delimiter, L =
L_clm + L_copy) on a 2-core CPU in under 10 minutes, and ends with a table of clm loss and bits per
byte and the copy / blank-copy token accuracy on the copied half (README "Memory models").

Presets:
* (none) = cpu: the main job: rows of 4 chunks x 16 tokens, V384, mixer encoder d128 L2 (4 heads,
  k4), mixer decoder d256 L4 (4 heads, channel MLP 2d: model.decoder.mlp_ratio=2), lr 4e-3,
  600 steps x 32 rows; scanned blocks (model.scan_layers) and train.combined_shared (the copy
  pass reuses the clm pass's memories of chunks 0-1 and decodes chunks 2-3 only: the same loss
  and gradients up to float rounding). Each step takes 0.45 of the time of the earlier preset's
  (decoder MLP 4d, two full passes, unscanned blocks; README "Speed of the main job's step").
  cpu_nomemory: the same with every memory slot empty (the control). cpu_clm: the memory model
  trained on next-token loss only. cpu_full_context: a plain mixer over the whole s·n_ctx row.
  cpu_transformer: transformer encoder and decoder. cpu_rmt: the recurrent-memory (RMT-like) baseline.
  Same data and budget, for side-by-side comparisons.
* cpu_curriculum: the curriculum of docs/objectives.md#curricula at CPU scale.
  Stage 1 trains the decoder on blank copy with
  the encoder loaded from --config.train.init_from (an autoencoder workdir from
  autoencoder.py:cpu_memory_encoder, or any model whose encoder matches) and frozen; stage 2 trains
  the combined objective with the encoder still frozen.
      python -m mixers_jax.train --config=configs/autoencoder.py:cpu_memory_encoder --workdir=runs/ae
      python -m mixers_jax.train --config=configs/memory.py:cpu_curriculum \
          --config.train.init_from=runs/ae --workdir=runs/mem_curriculum
  (300 + 300 steps) reaches blank copy 65.4% (loss 1.211) after stage 1 and, at step 600, blank
  copy 70.9% (1.034), clm loss 2.442 (accuracy 38.2%), copy 40.3% (2 min 45 s on 2 cores, after
  the autoencoder's 72 s).
* paper_mixer: encoder d512 k8 L16, decoder d1024 L16, 4 x 256 tokens, V8000, lr 5e-4, 200k steps,
  every block rematerialised with its matmul outputs kept (train.remat=matmuls_saved) so that
  batch 128 fits 80 GB devices on 8 of them.
  paper_transformer: 512/512 L16 H4, lr 2e-4, global batch 64, 100k steps. paper_curriculum: the
  transformer curriculum (blank copy with a frozen autoencoder encoder, 100k steps, then combined).
Give the data with --config.data.source=... for the paper presets.
* pretrained_decoder=DIR: the decoder is the Llama of DIR, a workdir made by
  ``python -m mixers_jax.hf import`` (docs/hf_import.md#memory-with-a-pretrained-decoder): its
  shape (and vocabulary, tokenizer) are read from DIR/config.json, its parameters loaded from DIR
  (train.init_from, init_map decoder=.) and frozen with its embedding; the mixer encoder (d128 L2)
  and the memory bridge d128 -> d_decoder are trained, with variable memory slots (no fill vectors
  before the pretrained decoder's tokens), at the cpu sizes (4 chunks x 16 tokens, 600 steps).
  pretrained_decoder_trainable=DIR: the same with the decoder trained too (lr 1e-4).
  pretrained_decoder_curriculum=DIR: the curriculum from it: 300 steps with the decoder frozen,
  then 300 with everything trained (lr 1e-4).
"""
import json
import os

from mixers_jax.config import CPU, PAPER, SMOKE, family_config

# copy_full / blank_copy_full: the same on full rows only (no pad in any chunk), as published.
_EVAL = ("clm", "copy", "blank_copy", "copy_full", "blank_copy_full")
# CPU scale (README "Memory models"): short chunks of a small, nearly character-level vocabulary,
# headed mixing (and k = 4 taps in the encoder) and a high learning rate, so that the memories are
# learned within the 10-minute budget; the published decoder is flat (no heads, k = 1), see paper_*.
_CPU = dict(CPU, **{
    "model.vocab_size": 384, "model.n_ctx": 16, "model.chunks": 4, "model.d_model": 256,
    "model.n_layers": 4, "model.heads": 4, "model.n_heads": 4, "model.encoder.d_model": 128,
    "model.encoder.n_layers": 2, "model.encoder.kernel": 4,
    "train.steps": 600, "train.batch_size": 32, "train.lr": 4e-3, "train.warmup_steps": 50,
    # Speed (README "Speed of the main job's step"): a decoder MLP of 2d instead of 4d, the copy
    # pass reusing the clm pass's memories (the same loss up to rounding) and scanned blocks.
    "model.decoder.mlp_ratio": 2, "train.combined_shared": True, "model.scan_layers": True,
})
# Half the CPU budget: the evaluation / checkpoint interval and each curriculum stage's length.
_HALF = _CPU["train.steps"] // 2
_CPU.update({"train.eval_every": _HALF, "train.checkpoint_every": _HALF})
# Kernel mixing is a mixer option: the transformer encoder takes k = 1.
_TRANSFORMER = {"model.encoder.kind": "transformer", "model.decoder.kind": "transformer",
                "model.encoder.kernel": 1, "train.lr": 5e-4}


def _paper(kind, d_enc, d_dec, lr, batch, steps, extra=()):
    return {
        **PAPER, "model.encoder.kind": kind, "model.decoder.kind": kind, "model.n_ctx": 256,
        "model.chunks": 4, "model.encoder.d_model": d_enc, "model.d_model": d_dec,
        "model.n_layers": 16, "model.n_heads": 4, "model.vocab_size": 8000,
        "train.steps": steps, "train.batch_size": batch, "train.lr": lr, **dict(extra),
    }


def _curriculum(first_steps, second_steps, lr):
    return ({"name": "blank_copy", "objective": "blank_copy", "steps": first_steps,
             "frozen": "encoder", "lr": lr},
            {"name": "combined", "objective": "combined", "steps": second_steps,
             "frozen": "encoder", "init_from": "", "lr": lr})


PRESETS_DICT = {
    "smoke": dict(SMOKE, **{"model.n_ctx": 16, "model.chunks": 4, "model.n_heads": 2}),
    "cpu": _CPU,
    "cpu_nomemory": dict(_CPU, **{"model.use_memory": False}),
    "cpu_clm": dict(_CPU, **{"train.objective": "clm"}),
    "cpu_full_context": dict(_CPU, **{"model.kind": "mixer", "model.n_ctx": 64, "model.mlp_ratio": 2}),
    "cpu_transformer": dict(_CPU, **_TRANSFORMER),
    "cpu_rmt": dict(_CPU, **{"model.kind": "rmt"}),
    "cpu_curriculum": dict(_CPU, **{"train.stages": _curriculum(_HALF, _HALF, 4e-3)}),
    # Rematerialisation, matmul outputs kept: 93 -> 25 GiB per device on 8 devices at batch 128
    # (README "Profiling and ahead-of-time checks").
    "paper_mixer": _paper("mixer", 512, 1024, 5e-4, 128, 200_000,
                          {"model.encoder.kernel": 8, "train.remat": "matmuls_saved"}),
    "paper_transformer": _paper("transformer", 512, 512, 2e-4, 64, 100_000),
    "paper_curriculum": _paper("transformer", 512, 512, 2e-4, 64, 200_000,
                               {"train.stages": _curriculum(100_000, 100_000, 2e-4)}),
}
PRESETS = tuple(PRESETS_DICT)
# Presets that take the imported workdir of their pretrained decoder: --config=...:NAME=DIR.
PRETRAINED = ("pretrained_decoder", "pretrained_decoder_trainable", "pretrained_decoder_curriculum")
# The decoder's fields read from the imported workdir's config.json (the Llama's shape).
_DECODER_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                   "mlp_ratio", "mlp_hidden", "rms_eps", "rope_theta", "rope_scaling", "rope_factor",
                   "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_n_ctx",
                   "tie_embeddings", "transformer")


def pretrained_decoder(name: str, workdir: str) -> dict:
    """The fields of preset ``name`` (one of PRETRAINED) with the decoder from ``workdir``."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: {path} does not exist (import one with python -m mixers_jax.hf "
                         "import)")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)["model"]
    if saved.get("kind") != "transformer":
        raise ValueError(f"{name}: {workdir} holds a {saved.get('kind')!r}, not a transformer")
    fields = dict(_CPU, **{f"model.{k}": saved[k] for k in _DECODER_FIELDS if k in saved})
    fields.update({
        "name": f"memory-{name}", "model.decoder.kind": "transformer", "model.decoder.d_model": 0, "model.decoder.n_layers": 0,
        "model.encoder.kind": "mixer", "model.memory_slots": "variable",
        "train.init_from": os.path.abspath(workdir), "train.init_map": "decoder=.",
        "train.frozen": "decoder", "train.frozen_encoder_embedding": "pretrained_frozen",
        "model.decoder.mlp_ratio": 0,  # the Llama's own MLP width
        "model.scan_layers": False,  # the decoder's parameter tree as imported (block_i/...)
    })
    if name == "pretrained_decoder_trainable":
        fields.update({"train.frozen": "", "train.lr": 1e-4})
    elif name == "pretrained_decoder_curriculum":
        fields["train.stages"] = (
            {"name": "frozen_decoder", "objective": "combined", "steps": _HALF, "frozen": "decoder"},
            {"name": "joint", "objective": "combined", "steps": _HALF, "frozen": "",
             "init_from": "", "lr": 1e-4})
    return fields


def get_config(arg=None):
    name, sep, workdir = (arg or "").partition("=")
    presets = PRESETS_DICT
    if name in PRETRAINED:
        if not sep or not workdir:
            raise ValueError(f"preset {name} needs the imported workdir: {name}=DIR")
        presets = {arg: pretrained_decoder(name, workdir)}
    return family_config("memory", presets, arg, {
        "model.kind": "memory", "train.objective": "combined", "train.eval_objectives": _EVAL,
    }, default="cpu")
