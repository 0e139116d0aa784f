"""Training curves of several runs side by side: ``python -m mixers_jax.plot --workdirs=A,B
--metric=eval/loss[,train/loss] --out=FIG.png [--labels=...] [--x=step|tokens] [--logy] [--csv=FILE]``.

One axis per metric, one line per run (mixers_jax/curves.py reads the runs' tensorboard logs).
Labels come from each run's ``config.json`` unless ``--labels`` gives them. ``--x=tokens`` plots
against training tokens = step × train.batch_size × row length. ``--csv`` writes every plotted point
(label, workdir, metric, step, x, value).

``--pools=A.json,B.json`` instead draws top-1 retrieval accuracy against candidate pool size from
results written by ``evaluate --retrieval --out`` (one line per file; BM25 and chance of the first
file dashed; docs/retrieval.md#evaluation).

Exit status: 0 written; 1 an OSError (e.g. an unwritable --out), one line; 2 bad flags, a metric
that no run logged, a missing workdir or log, an unknown image format, one line (a metric missing
from only some runs prints a ``warning:`` line naming them); 130 interrupted.
"""
from __future__ import annotations

from absl import flags

from mixers_jax import cli, curves
from mixers_jax.errors import UserError

FLAGS = cli.flag_values()
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Comma-separated training workdirs.", flag_values=FLAGS)
_POOLS = flags.DEFINE_list("pools", None, "Instead of --workdirs: retrieval results (JSON of "
                           "evaluate --retrieval --out) to plot as top-1 vs pool size.",
                           flag_values=FLAGS)
_METRIC = flags.DEFINE_list("metric", ["eval/loss"], "Comma-separated scalar tags (one axis each).",
                            flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Figure file (.png, .pdf, .svg, ...).", flag_values=FLAGS)
_LABELS = flags.DEFINE_list("labels", None, "One legend label per workdir (default: from config.json).",
                            flag_values=FLAGS)
_X = flags.DEFINE_enum("x", "step", ["step", "tokens"], "x axis: step | tokens.", flag_values=FLAGS)
_LOGY = flags.DEFINE_bool("logy", False, "Logarithmic y axis.", flag_values=FLAGS)
_CSV = flags.DEFINE_string("csv", None, "Also write the plotted points to this CSV file.",
                           flag_values=FLAGS)


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    if _POOLS.value:
        if _WORKDIRS.value:
            raise UserError("give --workdirs (training curves) or --pools (retrieval), not both")
        points = curves.plot_pools(_POOLS.value, _OUT.value, labels=_LABELS.value)
        print(f"wrote {_OUT.value}: top-1 vs pool size, {len(_POOLS.value)} result(s), "
              f"{len(points)} points")
        return
    if not _WORKDIRS.value:
        raise UserError("--workdirs is required (or --pools)")
    points = curves.plot_runs(_WORKDIRS.value, _METRIC.value, _OUT.value, labels=_LABELS.value,
                              x=_X.value, logy=_LOGY.value, csv=_CSV.value)
    runs = len({p["workdir"] for p in points})
    print(f"wrote {_OUT.value}: {len(_METRIC.value)} metric(s), {runs} run(s), {len(points)} points"
          + (f"; points in {_CSV.value}" if _CSV.value else ""))


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.plot``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, required=("out",))


if __name__ == "__main__":
    run_command()
