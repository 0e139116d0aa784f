"""Learned token-mixing matrices: ``python -m mixers_jax.inspect --workdir=DIR --out=DIR``.

For every layer (and head, and both matrices of expanded mixing) of a masked mixer or SRM, draws the
effective causal matrix A [n, n] as a heatmap PNG and reports how close it is to a Toeplitz, a
column-repeat and a row-repeat matrix: the relative Frobenius error of the best such approximation
(mixers_jax/structure.py defines the fits). Writes ``layer{L}[_head{H}][_{w1|w2}].png`` and
``structure.json`` (one record per matrix).
"""
from __future__ import annotations

import logging
import os

from absl import flags

from mixers_jax import cli
from mixers_jax.errors import UserError

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a masked mixer or SRM.",
                               flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Folder for the PNGs and structure.json.", flag_values=FLAGS)


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    out = _OUT.value
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out={out} is a file; give a folder")
    from mixers_jax.structure import effective_matrices, inspect_run  # jax: loaded after --help
    from mixers_jax.workdir import load_run  # jax, orbax: loaded after --help

    logging.getLogger("absl").setLevel(logging.ERROR)
    run = load_run(_WORKDIR.value)
    effective_matrices(run)  # a model without mixing matrices stops here, before --out is created
    records = inspect_run(run, out)
    print(f"{'matrix':<22} {'toeplitz':>9} {'col_repeat':>11} {'row_repeat':>11}   (relative Frobenius error)")
    for r in records:
        print(f"{r['matrix']:<22} {r['toeplitz']:>9.4f} {r['col_repeat']:>11.4f} {r['row_repeat']:>11.4f}")
    print(f"wrote {len(records)} heatmaps and structure.json to {out}")


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.inspect``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, required=("workdir", "out"))


if __name__ == "__main__":
    run_command()
