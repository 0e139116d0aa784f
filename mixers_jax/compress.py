"""Lossless compression of any file with a trained model (mixers_jax/codec.py: arithmetic coding).

    python -m mixers_jax.compress encode --workdir=DIR IN OUT [--context=auto|restart|slide]
        [--batch=128] [--force]
    python -m mixers_jax.compress decode --workdir=DIR IN OUT [--force]

encode prints the achieved bits per byte beside the model's own estimate and gzip / bz2 / xz on the
same file. With an autoencoder or embedding_clm workdir the stream stores each window's quantized
embedding before the arithmetic-coded tokens; the line then splits the payload into embedding and
residual bits and adds the model's estimate (Σ −log2 p + embedding bits) and the trainer's
accounting (total bpb at ``model.embed_bits``). A stream decodes only with the kind of model that
made it.

The tokens run through the model in at most ``--batch`` lanes of consecutive tokens, coded in
lockstep as one batch (mixers_jax/codec_lanes.py). ``--context=slide`` predicts every token from the
n_ctx − 1 tokens before it (Toeplitz and structured recurrent mixers, RoPE transformers);
``restart`` starts a fresh context every n_ctx − 1 tokens (every model); ``auto`` (default) slides
RoPE transformers and structured recurrent mixers, where sliding measured fewer bits, and restarts
the rest (Toeplitz mixers included; codec_lanes.slides_by_default). decode reads the layout from the stream (the decoder must use the encoder's
batch layout to compute bit-identical frequencies); a ``--context`` or ``--batch`` given to decode
that differs from the stream's is refused. Both print their coding time and throughput (KB/s,
model loading excluded). OUT is written atomically; an existing OUT is refused unless ``--force``. Runs on the CPU
(encode and decode must see bit-identical logits).

Exit status: 0 done; 1 an OSError (e.g. OUT not writable), one line; 2 bad flags or arguments, an
existing OUT without --force, a missing workdir or input, or a stream that does not decode with
this model (another model, truncated, corrupted), one line; 130 interrupted (OUT untouched).
"""
from __future__ import annotations

import logging
import os
import time

from absl import flags

from mixers_jax import cli
from mixers_jax.errors import UserError
from mixers_jax.fileio import read_bytes, write_atomic
from mixers_jax.metrics import compressor_bpb

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of the model.", flag_values=FLAGS)
_FORCE = flags.DEFINE_bool("force", False, "Overwrite an existing output file.", flag_values=FLAGS)
_CONTEXT = flags.DEFINE_enum("context", "auto", ["auto", "restart", "slide"],
                             "encode: restart the context every n_ctx - 1 tokens, or slide it "
                             "(models whose step form can); auto: slide transformers and recurrent mixers.",
                             flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 128, "encode: at most this many lanes coded in lockstep "
                              "(one batch; bounds memory).", flag_values=FLAGS)
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
    start = time.perf_counter()
    if command == "encode":
        stream, st = codec.encode_bytes(data, run, _CONTEXT.value, _BATCH.value)
        elapsed = time.perf_counter() - start
        write_atomic(dst, stream)
        n = max(len(data), 1)
        layout = (f", {st['context']} context in {st['lanes']} lanes" if "lanes" in st else "")
        line = (f"{len(data)} bytes -> {len(stream)} bytes ({st['tokens']} tokens, "
                f"{st['windows']} windows{layout}): achieved {8 * len(stream) / n:.4f} bits/byte "
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
        print(line + _speed(len(data), elapsed))
    else:
        _check_layout_flags(codec, data, run)
        out = codec.decode_bytes(data, run)
        elapsed = time.perf_counter() - start
        write_atomic(dst, out)
        print(f"{len(data)} bytes -> {len(out)} bytes" + _speed(len(out), elapsed))


def _speed(n_bytes: int, seconds: float) -> str:
    return f" | {seconds:.2f} s, {n_bytes / 1000 / max(seconds, 1e-9):.1f} KB/s"


def _check_layout_flags(codec, stream: bytes, run) -> None:
    """decode uses the stream's layout; a --context / --batch given to decode must give the same."""
    if FLAGS["context"].present or FLAGS["batch"].present:
        codec.check_layout_request(stream, run, _CONTEXT.value if FLAGS["context"].present else None,
                                   _BATCH.value if FLAGS["batch"].present else None)


def run_command(argv: list[str] | None = None) -> None:
    cli.run(main, FLAGS, doc=__doc__, argv=argv, positional=("encode|decode", "IN", "OUT"),
            required=("workdir",))


if __name__ == "__main__":
    run_command()
