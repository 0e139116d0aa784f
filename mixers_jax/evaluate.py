"""Evaluate a trained run: ``python -m mixers_jax.evaluate --workdir=DIR [--data=PATH] [--out=FILE.json]``.

Each objective named by ``--objectives`` (default: ``train.eval_objectives``, else
``train.objective``, of the curriculum stage that wrote the checkpoint) is evaluated exactly like
the trainer evaluates it: loss, token accuracy and bits per byte; gzip -9, bz2 -9 and xz -9e on the
very same target bytes; for kinds that store one embedding per sequence the compression accounting
at ``model.embed_bits`` bits per number, and with ``--quant`` the same for each ``model.embed_quant``
format ('all' for every one). mixers_jax/evaluation.py defines each number.

Data: the run's own validation split (the config's source, hash split and packing, tokenized with the
run's tokenizer; the workdir is only read), or ``--data`` (a text file, folder, glob, JSONL or
Parquet; every document used), packed the way the config packs into rows of
``input_length(model)`` tokens, or ``--data=random``: uniformly random tokens (every id with text)
in the shapes of the validation split's rows, drawn with ``--random_seed``; the table then compares
each loss with ln V (an autoencoder that does not merely copy its input scores above it;
docs/ablations.md#random-token-evaluation). ``--max_rows`` keeps the first N rows (0: all). Rows are batched by
``--batch_size`` (default ``train.batch_size``) and split over the local devices (data parallel,
parameters replicated); a short last batch is filled with pad rows, which count nothing.

Retrieval (``--retrieval``, and by default for a run tuned with a pair objective such as
'infonce'): top-1 accuracy of the run's embeddings over pools of held-out (query, passage) pairs of
each size in ``--pool_sizes`` (default: 32, 64, ..., 1024 up to the held-out set; a larger size is
an error), and BM25 on exactly the same pools (docs/retrieval.md#evaluation). The pairs, their
split, the padding and the embedding position are the run's ``retrieval.*`` and ``data.padding``
unless ``--pairs``, ``--held_out_fraction``, ``--padding`` or ``--position`` say otherwise, so an
untuned causal LM is scored on the same held-out pairs as a tuned one.

Output: a table on stdout and, with ``--out``, JSON holding the same numbers plus the workdir, step,
config name, data description, device and library versions (written atomically). Bad input (missing
workdir or checkpoint, unreadable or empty data, unknown objective or quant format) prints one
``error:`` line on stderr and exits with status 2 without writing anything.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging

from mixers_jax import cli
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic
from mixers_jax.metrics import QUANT_BITS

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, tokenizer.model, "
                               "checkpoints).", flag_values=FLAGS)
_DATA = flags.DEFINE_string("data", None, "Evaluate on this text file / folder / glob / JSONL / "
                            "Parquet instead of the run's validation split; 'random': uniformly "
                            "random tokens in the validation rows' shapes.", flag_values=FLAGS)
_RANDOM_SEED = flags.DEFINE_integer("random_seed", 0, "Seed of --data=random.", flag_values=FLAGS)
_DATA_FORMAT = flags.DEFINE_string("data_format", "auto", "auto | text | jsonl | parquet (with --data).",
                                   flag_values=FLAGS)
_TEXT_FIELD = flags.DEFINE_string("text_field", "", "JSONL / Parquet text column (default: the run's).",
                                  flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON to this file.", flag_values=FLAGS)
_MAX_ROWS = flags.DEFINE_integer("max_rows", 0, "Evaluate the first N rows only (0: all).",
                                 lower_bound=0, flag_values=FLAGS)
_QUANT = flags.DEFINE_string("quant", "", "Re-evaluate with model.embed_quant set to each of these "
                             f"formats ('all' or a comma list of {', '.join(QUANT_BITS)}).",
                             flag_values=FLAGS)
_OBJECTIVES = flags.DEFINE_string("objectives", "", "Comma list of objectives (default: "
                                  "train.eval_objectives or train.objective).", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Rows per evaluation batch (0: train.batch_size).",
                                   lower_bound=0, flag_values=FLAGS)
_DEVICES = flags.DEFINE_integer("devices", 0, "Local devices to split batches over (0: all).",
                                lower_bound=0, flag_values=FLAGS)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
_RETRIEVAL = flags.DEFINE_boolean("retrieval", False, "Top-1 over pools of held-out pairs and BM25 "
                                  "instead of the text objectives (the default for a run tuned "
                                  "with a pair objective).", flag_values=FLAGS)
_PAIRS = flags.DEFINE_string("pairs", "", "Retrieval pairs: 'builtin' or JSONL / Parquet files "
                             "(default: the run's retrieval.pairs).", flag_values=FLAGS)
_POOL_SIZES = flags.DEFINE_string("pool_sizes", "", "Comma list of pool sizes (default: 32, 64, "
                                  "..., 1024 up to the held-out set).", flag_values=FLAGS)
_QUERIES = flags.DEFINE_integer("queries", 0, "Held-out queries scored per pool size (0: all).",
                                lower_bound=0, flag_values=FLAGS)
_HELD_OUT = flags.DEFINE_float("held_out_fraction", 0.0, "Held-out share of the pairs (0: the "
                               "run's retrieval.held_out_fraction).", lower_bound=0.0,
                               flag_values=FLAGS)
_PADDING = flags.DEFINE_enum("padding", "", ["", "left", "right"], "Row padding for the embeddings "
                             "(default: the run's data.padding).", flag_values=FLAGS)
_POSITION = flags.DEFINE_integer("position", 0, "Embedding position from the row's end, < 0 (0: "
                                 "the run's retrieval.position).", upper_bound=0, flag_values=FLAGS)


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    out = _OUT.value
    if out and os.path.isdir(out):
        raise UserError(f"--out={out} is a folder; give a file name")
    absl_logging.set_verbosity(absl_logging.ERROR)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from mixers_jax import evaluation  # jax, the models, the data pipeline: loaded after --help

    if _RETRIEVAL.value or evaluation.tuned_on_pairs(_WORKDIR.value):
        result = evaluation.evaluate_retrieval(
            _WORKDIR.value, pairs=_PAIRS.value, pool_sizes=_POOL_SIZES.value,
            queries=_QUERIES.value, padding=_PADDING.value, position=_POSITION.value,
            held_out_fraction=_HELD_OUT.value, batch_size=_BATCH_SIZE.value, step=_STEP.value)
        if out:
            write_atomic(out, json.dumps(evaluation.json_ready(result), indent=2, sort_keys=True))
        print(evaluation.format_retrieval(result))
        if out:
            print(f"wrote {out}")
        return
    result = evaluation.evaluate_run(
        _WORKDIR.value, data=_DATA.value, max_rows=_MAX_ROWS.value, quants=_QUANT.value,
        objectives=_OBJECTIVES.value, batch_size=_BATCH_SIZE.value, devices=_DEVICES.value,
        data_format=_DATA_FORMAT.value, text_field=_TEXT_FIELD.value, step=_STEP.value,
        random_seed=_RANDOM_SEED.value)
    bad = evaluation.non_finite_losses(result)
    if bad:
        raise UserError(f"non-finite evaluation loss (NaN or inf) for {', '.join(bad)} at step "
                        f"{result['step']} of {result['workdir']}; no result written")
    if out:
        write_atomic(out, json.dumps(evaluation.json_ready(result), indent=2, sort_keys=True))
    print(evaluation.format_table(result))
    if out:
        print(f"wrote {out}")


def run_command(argv: Sequence[str] | None = None) -> None:
    """``python -m mixers_jax.evaluate``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, required=("workdir",))


if __name__ == "__main__":
    run_command()
