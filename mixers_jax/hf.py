"""Hugging Face Llama checkpoints in and out (docs/hf_import.md; the library: mixers_jax/hf_llama.py).

    python -m mixers_jax.hf import --checkpoint=HF_DIR --workdir=OUT [--tokenizer=FILE]
        [--n_ctx=N] [--dtype=float32|bfloat16|float16]
    python -m mixers_jax.hf export --workdir=DIR --out=HF_DIR [--dtype=float32|bfloat16|float16]
        [--max_shard_mb=4096]

import reads HF_DIR (config.json and model.safetensors, or the shards of
model.safetensors.index.json; a Llama-family model) and its tokenizer (tokenizer.json through the
``tokenizers`` library, or a sentencepiece tokenizer.model), and writes a workdir (config, tokenizer,
checkpoint 0) that evaluate, generate, compress and ``train.init_from`` read like a trained run's.
``--n_ctx`` (0: the checkpoint's max_position_embeddings) is the model's context length; the
generation KV cache holds that many positions. ``--dtype`` is the compute dtype (parameters stay
float32). export writes the newest checkpoint of a Llama transformer workdir in the same layout.
Bad input (a missing shard or tensor, a shape that does not match config.json, a model that is not
Llama-like, a tokenizer whose vocabulary is not the model's) is one line, nothing written.
"""
from __future__ import annotations

import time

from absl import flags, logging

from mixers_jax import cli

FLAGS = cli.flag_values()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "import: the Hugging Face checkpoint directory.",
                                  flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "import: the workdir to write (new or empty); "
                               "export: the workdir to read.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "export: the directory to write (new or empty).",
                           flag_values=FLAGS)
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "import: tokenizer file (default: the checkpoint's "
                                 "tokenizer.json, else tokenizer.model).", flag_values=FLAGS)
_N_CTX = flags.DEFINE_integer("n_ctx", 0, "import: context length (0: max_position_embeddings).",
                              lower_bound=0, flag_values=FLAGS)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"],
                           "import: compute dtype; export: tensor dtype.", flag_values=FLAGS)
_SHARD_MB = flags.DEFINE_integer("max_shard_mb", 4096, "export: largest safetensors file (MiB).",
                                 lower_bound=1, flag_values=FLAGS)


def main(argv: list[str]) -> None:
    action = argv[1]
    logging.set_verbosity(logging.ERROR)
    from mixers_jax.errors import UserError  # the library and jax: loaded after --help
    from mixers_jax import hf_llama

    start = time.time()
    if action == "import":
        if not _CHECKPOINT.value or not _WORKDIR.value:
            raise UserError("import needs --checkpoint and --workdir")
        out = hf_llama.import_workdir(_CHECKPOINT.value, _WORKDIR.value, tokenizer=_TOKENIZER.value,
                                      n_ctx=_N_CTX.value, dtype=_DTYPE.value)
        print(f"imported {out['params']:,} parameters from {_CHECKPOINT.value} into {out['workdir']} "
              f"(tokenizer {out['tokenizer']}) in {time.time() - start:.1f} s")
    elif action == "export":
        if not _WORKDIR.value or not _OUT.value:
            raise UserError("export needs --workdir and --out")
        files = hf_llama.export_workdir(_WORKDIR.value, _OUT.value, dtype=_DTYPE.value,
                                        max_shard_bytes=_SHARD_MB.value << 20)
        print(f"exported {_WORKDIR.value} to {len(files)} files in {_OUT.value} "
              f"in {time.time() - start:.1f} s")
    else:
        raise UserError(f"unknown action {action!r}; choose import or export")


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.hf``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, positional=("action",))


if __name__ == "__main__":
    run_command()
