"""Analysis probes of a trained run: ``python -m mixers_jax.probe --what=inversion|entropy|attribution
--workdir=DIR [...]`` (docs/analysis.md; the library is mixers_jax/probes.py).

* ``--what=inversion [--untrained] [--depths=1,2] [--samples=4] [--steps=500] [--out=PREFIX]
  [--include=A.json,...]``: recovers input embeddings from the output of the first k blocks by plain
  gradient descent (lr 0.02 -> 0.002) and prints the normalized Hamming error (true token not among
  the top 5 of the pseudo-inverse scores) per depth k, for ``--samples`` validation rows; a mixer or
  transformer causal LM. ``--untrained``: fresh weights of the same config. ``--out`` writes
  PREFIX.json and PREFIX.png (error vs depth), with the results of ``--include`` beside this one;
  without ``--workdir`` the ``--include`` results alone are tabulated and plotted.
* ``--what=entropy --out=PREFIX [--text=...] [--short_workdir=DIR2]``: per-token entropies (nats)
  by the shifting method (left-padded rows, pads masked; the two-model form with a second model of
  context n − 1), for an embedding-augmented (oracle) LM or a causal LM; writes PREFIX.json and
  PREFIX.png (the values over the text).
* ``--what=attribution --out=PREFIX [--text=...] [--slot=0]``: attribution of the outputs to a
  memory slot (occlusion L1 and 1 − cos, gradient × input, noise shift) for a memory model or an
  embedding-augmented LM; writes PREFIX.json and the heatmap PREFIX.png.

Without ``--text`` the text is the first paragraph of the run's validation split, cut to what the
context holds. Exit status: 0 done; 2 bad input, one ``error:`` line and nothing written (a model
without an embedding to invert or without memory, a depth beyond the model's, a text longer than
the context, a missing workdir, an unknown image format); 1 an OSError, one line; 130 interrupted.
"""
from __future__ import annotations

import logging

from absl import flags

from mixers_jax import cli
from mixers_jax.errors import UserError

FLAGS = cli.flag_values()
_WHAT = flags.DEFINE_enum("what", None, ["inversion", "entropy", "attribution"], "The probe to run.",
                          flag_values=FLAGS)
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (required but for an inversion "
                               "table of --include results only).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output prefix: PREFIX.json and PREFIX.png are written "
                           "(required for entropy and attribution).", flag_values=FLAGS)
_UNTRAINED = flags.DEFINE_bool("untrained", False, "inversion: fresh weights of the run's config "
                               "(its seed) instead of the trained checkpoint.", flag_values=FLAGS)
_DEPTHS = flags.DEFINE_list("depths", None, "inversion: depths k to probe (default 1..n_layers).",
                            flag_values=FLAGS)
_SAMPLES = flags.DEFINE_integer("samples", 4, "inversion: validation rows to invert.", lower_bound=1,
                                flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 500, "inversion: gradient-descent steps.", lower_bound=1,
                              flag_values=FLAGS)
_LR = flags.DEFINE_list("lr", ["0.02", "0.002"], "inversion: first and last learning rate "
                        "(linear decay).", flag_values=FLAGS)
_INCLUDE = flags.DEFINE_list("include", [], "inversion: earlier PREFIX.json results drawn and "
                             "tabulated beside this one.", flag_values=FLAGS)
_TEXT = flags.DEFINE_string("text", None, "entropy / attribution: the text (default: a held-out "
                            "paragraph).", flag_values=FLAGS)
_SHORT = flags.DEFINE_string("short_workdir", None, "entropy: a second model of context n - 1 for "
                             "the two-model form.", flag_values=FLAGS)
_SLOT = flags.DEFINE_integer("slot", 0, "attribution: the memory slot (chunk) to attribute to.",
                             lower_bound=0, flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Random start (inversion) and noise (attribution).",
                             flag_values=FLAGS)


def _ints(values, name: str) -> list[int]:
    try:
        return [int(v) for v in values]
    except ValueError:
        raise UserError(f"--{name} takes integers, got {','.join(values)}") from None


def _lrs() -> tuple[float, float]:
    try:
        lr = [float(v) for v in _LR.value]
    except ValueError:
        raise UserError(f"--lr takes two numbers, got {','.join(_LR.value)}") from None
    if len(lr) != 2 or min(lr) <= 0:
        raise UserError(f"--lr takes two positive numbers (first, last), got {','.join(_LR.value)}")
    return lr[0], lr[1]


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    what = _WHAT.value
    if what != "inversion" and not _OUT.value:
        raise UserError(f"--what={what} needs --out=PREFIX")
    if what != "inversion" and (_UNTRAINED.value or _DEPTHS.value or _INCLUDE.value):
        raise UserError("--untrained, --depths and --include belong to --what=inversion")
    if what == "inversion" and (_TEXT.value is not None or _SHORT.value):
        raise UserError("--text and --short_workdir belong to --what=entropy / attribution")
    if not _WORKDIR.value and not (what == "inversion" and _INCLUDE.value):
        raise UserError("--workdir is required (--what=inversion without it needs --include, "
                        "earlier results to tabulate and plot)")
    depths = _ints(_DEPTHS.value, "depths") if _DEPTHS.value else None
    lr, lr_end = _lrs()
    from mixers_jax import inversion, probes  # jax: loaded after --help

    logging.getLogger("absl").setLevel(logging.ERROR)
    if what == "inversion" and not _WORKDIR.value:  # tabulate and plot earlier results only
        results = probes.combine_results(_INCLUDE.value, _OUT.value)
        print("normalized Hamming error (true token not in the top 5)")
        print(inversion.format_table(results))
        if _OUT.value:
            print(f"wrote {_OUT.value}.json, {_OUT.value}.png")
    elif what == "inversion":
        schedule = inversion.Schedule(steps=_STEPS.value, lr=lr, lr_end=lr_end)
        results = probes.inversion_probe(_WORKDIR.value, _UNTRAINED.value, depths, _SAMPLES.value,
                                         schedule, _SEED.value, _OUT.value, _INCLUDE.value)
        print("normalized Hamming error (true token not in the top 5)")
        print(inversion.format_table(results))
        if _OUT.value:
            print(f"wrote {_OUT.value}.json, {_OUT.value}.png")
    elif what == "entropy":
        probes.entropy_probe(_WORKDIR.value, _TEXT.value, _OUT.value, _SHORT.value)
    else:
        probes.attribution_probe(_WORKDIR.value, _TEXT.value, _OUT.value, _SLOT.value, _SEED.value)


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.probe``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, required=("what",))


if __name__ == "__main__":
    run_command()
