"""Rerun every CPU experiment and regenerate the results page: ``python -m mixers_jax.sweep
--out=results/ [--only=NAME,...] [--text=FILE] [--dry_run] [--page_only] [--page=docs/results.md]
[--figures=DIR]``.

The experiments are the table of mixers_jax/experiments.py (autoencoders, causal LMs at equal steps
and equal wall time and on another text, embedding-augmented CLMs, the quantization sweep,
information probes, memory models); each trains into ``<out>/<name>/`` and runs its follow-up
commands (mixers_jax/sweep_runner.py). Resumable: a finished run is skipped, a half-finished one
resumes exactly; nothing is deleted. One progress line per experiment. ``--only`` runs the named
experiments and what they need. ``--text`` is the text file of the other-corpus rows (without it
they are not run). ``--dry_run`` prints what would run and changes nothing. Then the page
(mixers_jax/results_page.py) is regenerated from the run folders (``--page_only``: only that),
figures into ``--figures`` (default: ``figures/results`` beside the page).

Exit status: 0 every selected experiment finished (or was skipped); 1 one failed or was blocked
(named in its line; the page is still written, naming it); 2 bad flags; 75 interrupted by Ctrl-C
or SIGTERM after the running command saved its checkpoint (rerun to resume); 130 interrupted
otherwise.
"""
from __future__ import annotations

import os

from absl import flags

from mixers_jax import cli
from mixers_jax.errors import UserError

FLAGS = cli.flag_values()
_OUT = flags.DEFINE_string("out", "results", "Results folder: one run folder per experiment.",
                           flag_values=FLAGS)
_ONLY = flags.DEFINE_list("only", None, "Run only these experiments (and what they need).",
                          flag_values=FLAGS)
_TEXT = flags.DEFINE_string("text", "", "Text file for the rows on another text than the embedded "
                            "corpus (e.g. tinyshakespeare.txt).", flag_values=FLAGS)
_DRY = flags.DEFINE_bool("dry_run", False, "Print what would run; run and write nothing.",
                         flag_values=FLAGS)
_PAGE_ONLY = flags.DEFINE_bool("page_only", False, "Only regenerate the page from the run folders.",
                               flag_values=FLAGS)
_PAGE = flags.DEFINE_string("page", "docs/results.md", "The results page (written between its "
                            "markers, or fresh).", flag_values=FLAGS)
_FIGURES = flags.DEFINE_string("figures", "", "Figures folder (default: figures/results beside the "
                               "page).", flag_values=FLAGS)


def main(argv: list[str]) -> None:
    del argv
    from mixers_jax import experiments, results_page, sweep_runner

    try:
        selected = experiments.select(",".join(_ONLY.value or []))
    except ValueError as e:
        raise UserError(str(e)) from None
    if _TEXT.value and not os.path.isfile(_TEXT.value):
        raise UserError(f"--text={_TEXT.value} is not a file")
    out = _OUT.value
    sweep = sweep_runner.Sweep(selected, out, text_file=_TEXT.value,
                               print_fn=lambda line: print(line, flush=True))
    if _DRY.value:
        sweep.dry_run()
        return
    failed = []
    if not _PAGE_ONLY.value:
        print(f"sweep: {len(selected)} experiments into {os.path.abspath(out)}", flush=True)
        sweep_runner.measure_machine(out)
        failed = sweep.run()
    figures = _FIGURES.value or os.path.join(os.path.dirname(_PAGE.value) or ".", "figures", "results")
    written = results_page.write_page(out, _PAGE.value, figures, experiments.EXPERIMENTS, shown=out)
    print(f"wrote {_PAGE.value} and {len(written)} figure(s) in {figures}", flush=True)
    if failed:
        raise SystemExit(cli.EXIT_FAILURE)


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.sweep``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv)


if __name__ == "__main__":
    run_command()
