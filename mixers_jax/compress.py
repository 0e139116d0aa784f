"""Lossless compression of any file with a trained model (mixers_jax/codec.py: arithmetic coding).

    python -m mixers_jax.compress encode --workdir=DIR IN OUT [--force]
    python -m mixers_jax.compress decode --workdir=DIR IN OUT [--force]

encode prints the achieved bits per byte beside the model's own estimate and gzip / bz2 / xz on the
same file. With an autoencoder or embedding_clm workdir the stream stores each window's quantized
embedding before the arithmetic-coded tokens; the line then splits the payload into embedding and
residual bits and adds the model's estimate (Σ −log2 p + embedding bits) and the trainer's
accounting (total bpb at ``model.embed_bits``). A stream decodes only with the kind of model that
made it. OUT is written atomically; an existing OUT is refused unless ``--force``. Runs on the CPU
(encode and decode must see bit-identical logits).

Exit status: 0 done; 1 an OSError (e.g. OUT not writable), one line; 2 bad flags or arguments, an
existing OUT without --force, a missing workdir or input, or a stream that does not decode with
this model (another model, truncated, corrupted), one line; 130 interrupted (OUT untouched).
"""
from __future__ import annotations

import logging
import os

from absl import flags

from mixers_jax import cli
from mixers_jax.errors import UserError
from mixers_jax.fileio import read_bytes, write_atomic
from mixers_jax.metrics import compressor_bpb

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the model.", flag_values=FLAGS)
_FORCE = flags.DEFINE_bool("force", False, "Overwrite an existing output file.", flag_values=FLAGS)
COMMANDS = ("encode", "decode")


def main(argv: list[str]) -> None:
    command, src, dst = argv[1:]
    if command not in COMMANDS:
        raise UserError(f"unknown command {command!r}; choose encode or decode")
    if os.path.isdir(dst):
        raise UserError(f"output {dst} is a folder; give a file name")
    if os.path.lexists(dst) and not _FORCE.value:
        raise UserError(f"output {dst} exists; pass --force to overwrite it")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # bit-reproducible logits: CPU, both ways
    logging.getLogger("absl").setLevel(logging.ERROR)
    from mixers_jax import codec  # jax, the models: loaded after --help
    from mixers_jax.workdir import load_run  # jax, orbax: loaded after --help

    data = read_bytes(src)
    run = load_run(_WORKDIR.value)
    if command == "encode":
        stream, st = codec.encode_bytes(data, run)
        write_atomic(dst, stream)
        n = max(len(data), 1)
        line = (f"{len(data)} bytes -> {len(stream)} bytes ({st['tokens']} tokens, "
                f"{st['windows']} windows): achieved {8 * len(stream) / n:.4f} bits/byte "
                f"(payload only {8 * st['payload_bytes'] / n:.4f}")
        if "embedding_bits" in st:  # a stored-embedding model: the payload's two parts
            line += (f" = embedding {st['embedding_bits'] / n:.4f} ({st['stored_numbers']} x "
                     f"{st['embed_quant']} per window) + residual {st['residual_bits'] / n:.4f}) | "
                     f"model estimate {(st['model_bits'] + st['embedding_bits']) / n:.4f} "
                     f"(decoder {st['model_bits'] / n:.4f}) | accounting total bpb "
                     f"{st['accounting_total_bpb']:.4f} (model.embed_bits={st['accounting_embed_bits']})")
        else:
            line += f") | model estimate {st['model_bits'] / n:.4f}"
        if data:
            line += "".join(f" | {k} {v:.4f}" for k, v in compressor_bpb(data).items())
        print(line)
    else:
        out = codec.decode_bytes(data, run)
        write_atomic(dst, out)
        print(f"{len(data)} bytes -> {len(out)} bytes")


def run_command(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, doc=__doc__, argv=argv, positional=("encode|decode", "IN", "OUT"),
            required=("workdir",))


if __name__ == "__main__":
    run_command()
