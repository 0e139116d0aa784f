"""The results page (docs/results.md) from the run folders of a sweep (the page side of
``python -m mixers_jax.sweep``).

Reads each experiment's folder under the results folder: ``results.json`` (the final evaluation),
``config.json``, ``log.txt`` (the parameter count), ``sweep.json`` (wall time, equal-time steps),
the tensorboard logs under ``tb/`` (curves and ``perf/step_s``, read by :mod:`mixers_jax.curves`)
and follow-up outputs such as ``quant.json``. Writes one markdown table per section of
:mod:`mixers_jax.experiments` and PNG loss curves (matplotlib, Agg) into a figures folder. A run
that is missing, unfinished, failed or diverged keeps its row, which names it
("not run: results/NAME"): nothing is dropped silently. Each row carries the published figure
where one exists and one sentence on whether the expected direction holds here.

The page text goes between the markers ``<!-- results:begin -->`` and ``<!-- results:end -->`` of
the page file (the hand-written text around them is kept); a file without them is written fresh.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence

from mixers_jax import curves
from mixers_jax.experiments import EXPERIMENTS, NEAR, Experiment
from mixers_jax.fileio import write_atomic
from mixers_jax.metrics import H0_PUBLISHED, format_duration
from mixers_jax.sweep_runner import (LOG_FILE, MACHINE_FILE, RESULTS_FILE, STEP_TIME, SWEEP_FILE,
                                     read_json, status)

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QUANT_FILE = "quant.json"


@dataclasses.dataclass
class Run:
    """What a run folder holds (absent pieces are None / empty)."""
    exp: Experiment
    folder: str  # as shown on the page, e.g. results/ae_mixer
    state: str  # sweep_runner.status
    results: dict | None
    sweep: dict | None
    config: dict | None
    scalars: dict
    params_m: float | None
    quant: dict | None


def load_run(out: str, exp: Experiment, shown: str) -> Run:
    path = os.path.join(out, exp.name)
    tb = os.path.join(path, "tb")
    scalars = curves.read_scalars(tb) if curves.event_files(tb) else {}
    return Run(exp, f"{shown}/{exp.name}", status(exp, out), read_json(os.path.join(path, RESULTS_FILE)),
               read_json(os.path.join(path, SWEEP_FILE)), read_json(os.path.join(path, "config.json")),
               scalars, _params_m(os.path.join(path, "log.txt")), read_json(os.path.join(path, QUANT_FILE)))


def _params_m(log_path: str) -> float | None:
    try:
        with open(log_path, encoding="utf-8") as f:
            match = re.search(r"([0-9.]+)M params", f.read())
    except OSError:
        return None
    return float(match.group(1)) if match else None


# --------------------------------------------------------------------------- metrics


def _eval(run: Run, objective: str | None = None) -> dict | None:
    r = run.results or {}
    if objective is None:
        return r.get("eval")
    return (r.get("evals") or {}).get(objective)


def _get(objective: str | None, key: str, fallback: str | None = None) -> Callable[[Run], float | None]:
    def metric(run: Run) -> float | None:
        ev = _eval(run, objective)
        if not ev:
            return None
        value = ev.get(key, ev.get(fallback) if fallback else None)
        return None if value is None else float(value)
    return metric


def _information(run: Run) -> float | None:
    loss = _get(None, "loss")(run)
    return None if loss is None else 1.0 - loss / H0_PUBLISHED


def _step_s(run: Run) -> float | None:
    series = run.scalars.get(STEP_TIME)
    return statistics.median(v for _, v in series) if series else None


METRICS: dict[str, Callable[[Run], float | None]] = {
    "loss": _get(None, "loss"), "accuracy": _get(None, "accuracy"), "bpb": _get(None, "bpb"),
    "normalized_loss": _get(None, "normalized_loss", "loss"), "total_bpb": _get(None, "total_bpb", "bpb"),
    "I_e": _information,
    "clm_loss": _get("clm", "loss"), "clm_bpb": _get("clm", "bpb"), "clm_acc": _get("clm", "accuracy"),
    "copy_acc": _get("copy", "accuracy"), "blank_copy_acc": _get("blank_copy", "accuracy"),
    "blank_copy_loss": _get("blank_copy", "loss"),
    "params": lambda run: run.params_m,
    "step_s": _step_s,
    "steps": lambda run: None if not run.results else float(run.results.get("final_step", "nan")),
    "n": lambda run: None if not run.config else float(run.config["model"]["n_ctx"]),
    "wall_s": lambda run: None if not run.sweep else float(run.sweep.get("wall_s", 0.0)),
}
_PERCENT = {"accuracy", "clm_acc", "copy_acc", "blank_copy_acc"}


def fmt(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if metric in _PERCENT:
        return f"{100 * value:.1f}%"
    if metric == "params":
        return f"{value:.2f}M"
    if metric in ("steps", "n"):
        return f"{int(value)}"
    if metric == "wall_s":
        return format_duration(value)
    if metric == "step_s":
        return f"{value:.3f}"
    return f"{value:.4f}"


# --------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class Section:
    title: str
    intro: str
    columns: tuple[tuple[str, str], ...]  # (header, metric)
    curves: tuple[str, ...] = ("eval/loss", "train/loss")
    x: str = "step"  # or "time": step x the run's median step time
    also: tuple[str, ...] = ()  # rows of other sections shown here too (references)


_COMMON = (("params", "params"), ("s / step", "step_s"), ("wall time", "wall_s"))
SECTIONS: dict[str, Section] = {
    "autoencoders": Section(
        "Autoencoders", "`configs/autoencoder.py:cpu_recon*` presets: 32-token windows of the embedded corpus "
        "(V512, d256, 2 + 2 layers, 1000 steps of 32 windows), one embedding per window, the same "
        "data and steps for every run; the mixer with 4 heads and lr 4e-3, the transformer with 8 heads "
        "and lr 5e-4 (the best of four). Loss: the reconstruction "
        "cross-entropy (nats per token) on held-out windows; I_e = 1 − H/9.03.",
        (("eval loss", "loss"), ("token acc.", "accuracy"), ("bits per byte", "bpb"), ("I_e", "I_e"),
         *_COMMON)),
    "clm": Section(
        "Causal LMs, equal steps", "`mixer_clm.py:cpu_small` / `transformer_clm.py:cpu_small`: d128 L4 "
        "n128 V1024, 800 steps of 16 rows, the same data, order and steps for all; each kind at the "
        "better of two learning rates in 300-step trials (mixer 8e-3, transformer 1.5e-3; the "
        "headed and Toeplitz mixers use the flat mixer's).",
        (("eval loss", "loss"), ("token acc.", "accuracy"), ("bits per byte", "bpb"), ("steps", "steps"),
         *_COMMON)),
    "clm_time": Section(
        "Causal LMs, equal wall time", "Each model trained for the training time of the flat mixer's "
        "equal-steps run on this machine: steps = steps_flat × (flat s/step) / (its s/step), the two "
        "step times measured in turn just before by `bench --suite=runs` (the run's step_times.json); "
        "the schedule decays to 0 at the last step. The curves are drawn against step × the median "
        "s/step each run logged.",
        (("eval loss", "loss"), ("token acc.", "accuracy"), ("bits per byte", "bpb"), ("steps", "steps"),
         *_COMMON), curves=("train/loss", "eval/loss"), x="time", also=("clm_flat",)),
    "clm_text": Section(
        "Causal LMs on another text", "The same presets on the text file given with `sweep --text=FILE` "
        "(not the embedded corpus); its own tokenizer and validation split.",
        (("eval loss", "loss"), ("token acc.", "accuracy"), ("bits per byte", "bpb"), ("steps", "steps"),
         *_COMMON)),
    "eclm": Section(
        "Embedding-augmented CLM vs plain CLM", "`embedding_clm.py:cpu_small` (the decoder of "
        "`mixer_clm.py:cpu_small` reading a 64-number embedding of the whole window) next to the plain "
        "CLMs. Normalized loss and total bits per byte include the stored embedding "
        "(16 bits per number); for a plain CLM they equal its loss and bits per byte.",
        (("loss", "loss"), ("normalized loss", "normalized_loss"), ("bits per byte", "bpb"),
         ("total bits per byte", "total_bpb"), *_COMMON), curves=("eval/loss", "eval/clm/normalized_loss"),
        also=("clm_flat", "clm_transformer")),
    "quant": Section(
        "Quantization sweep", "`evaluate --quant=all` of the embedding-augmented mixer, trained "
        "plainly and with noise QAT: the stored embedding cast to each format after training.",
        (), curves=(), also=("eclm_mixer",)),
    "probes": Section(
        "Information-retention probes", "`configs/information.py`: the encoder of a trained run frozen, "
        "a fresh 2-layer decoder of the encoder's kind (d128 for the cpu_small encoders, else d256) "
        "reconstructs all n tokens from its one embedding. "
        "Published: FineWeb n512, d1024 probe (CE / I_e / token accuracy).",
        (("n", "n"), ("H (nats)", "loss"), ("I_e", "I_e"), ("token acc.", "accuracy"),
         ("wall time", "wall_s"))),
    "memory": Section(
        "Memory models", "`configs/memory.py` presets: rows of 4 chunks × 16 tokens, V384, the same data "
        "and steps for all; copy accuracies on the copied half only.",
        (("clm loss", "clm_loss"), ("clm bpb", "clm_bpb"), ("clm acc.", "clm_acc"), ("copy acc.", "copy_acc"),
         ("blank-copy acc.", "blank_copy_acc"), ("blank-copy loss", "blank_copy_loss"),
         ("wall time", "wall_s")),
        curves=("eval/clm/loss", "eval/blank_copy/accuracy")),
}


def absent_text(run: Run) -> str | None:
    """Why a run has no result ('not run: results/NAME', ...); None when it has one."""
    r = run.results
    if r and r.get("diverged"):
        return f"diverged at step {r['diverged'].get('step')}: {run.folder}"
    if r:
        return None
    if run.state == "failed":
        return f"failed: {run.folder} (see {LOG_FILE})"
    if run.state == "started":
        return f"not finished: {run.folder}"
    return f"not run: {run.folder}" + (" (needs `--text=FILE`)" if run.exp.needs_text else "")


def direction(run: Run, runs: dict[str, Run]) -> str:
    """One sentence: the published direction and whether it holds here; where it does not, a
    second naming the published-size runs that would decide it."""
    e = run.exp.expect
    if e is None:
        return ""
    other = runs.get(e.other)
    a = METRICS[e.metric](run)
    b = METRICS[e.metric](other) if other else None
    if a is None or b is None:
        missing = run.folder if a is None else (other.folder if other else e.other)
        return f"Published: {e.says}. Not measured here ({missing} has no result)."
    sign = {"<": "<", ">": ">", "~": "≈"}[e.op]
    shown = f"{fmt(e.metric, a)} vs {fmt(e.metric, b)} ({other.exp.label})"
    held = verdict(e.op, a, b)
    text = f"Published: {e.says}; {held} here ({e.metric} {shown}, expected {sign})."
    return text if held == "holds" else f"{text} Decided at scale by {e.at_scale}."


def verdict(op: str, a: float, b: float) -> str:
    """'holds' / 'does not hold' for ``a op b``; a difference below 1e-4 (relative, as shown to
    four digits) is no difference: it satisfies '~' but neither '<' nor '>'."""
    if abs(a - b) <= 1e-4 * max(1.0, abs(b)):
        return "holds" if op == "~" else "does not hold (no difference)"
    return "holds" if {"<": a < b, ">": a > b, "~": abs(a - b) <= NEAR * abs(b)}[op] else "does not hold"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def section_table(section: Section, rows: Sequence[Run], runs: dict[str, Run]) -> str:
    head = ["run", *(h for h, _ in section.columns), "published", "direction"]
    lines = [_row(head), _row(["---"] * len(head))]
    for run in rows:
        why = absent_text(run)
        if why:
            values = [why] + ["–"] * (len(section.columns) - 1)
        else:
            values = [fmt(m, METRICS[m](run)) for _, m in section.columns]
        extra = ""
        if run.sweep and run.sweep.get("equal_time"):
            plan = run.sweep["equal_time"]
            extra = (f" ({plan['steps']} steps = {plan['ref_steps']} × {plan['ref_step_s']:.3f} / "
                     f"{plan['step_s']:.3f})")
        lines.append(_row([f"{run.exp.label} (`{run.folder}`){extra}", *values,
                           run.exp.published or "–", direction(run, runs) or "–"]))
    return "\n".join(lines)


# Quantization: the published loss of each format (post-training cast; noise-QAT, 200k steps).
PUBLISHED_QUANT = {"none": ("2.13 (unquantized)", "–"), "float16": ("2.26", "2.424"),
                   "bfloat16": ("2.28", "–"), "int8": ("2.47 (probe layer)", "2.437"),
                   "float8_e4m3fn": ("4.86", "2.672"), "float8_e5m2": ("6.65", "3.253")}
_QUANT_ORDER = ("none", "float16", "bfloat16", "int8", "float8_e4m3fn", "float8_e5m2")


def quant_table(rows: Sequence[Run]) -> str:
    head = ["run", "format", "bits", "loss", "bits per byte", "normalized loss", "total bits per byte",
            "published (cast / noise-QAT)", "direction"]
    lines = [_row(head), _row(["---"] * len(head))]
    for run in rows:
        objectives = (run.quant or {}).get("objectives") or {}
        if not objectives:
            why = absent_text(run) or f"not run: {run.folder}/{QUANT_FILE}"
            lines.append(_row([f"{run.exp.label} (`{run.folder}`)", why] + ["–"] * (len(head) - 2)))
            continue
        first = next(iter(objectives.values()))
        table = dict(first.get("quant") or {})
        table.setdefault("none", first)
        qat = "qat" in run.exp.name
        base = table.get("float16", {}).get("loss")
        for q in _QUANT_ORDER:
            if q not in table:
                continue
            v = table[q]
            says = ""
            if base is not None and q not in ("none", "float16"):  # float32 and fp16: the references
                expected = "~" if qat or q == "bfloat16" else ">"
                what = ("with noise QAT every format stays close to fp16" if qat
                        else "a 16-bit cast costs little" if expected == "~"
                        else "an 8-bit cast costs more than fp16")
                says = (f"Published: {what}; {verdict(expected, v['loss'], base)} here "
                        f"({v['loss']:.4f} vs fp16 {base:.4f}).")
            pub = PUBLISHED_QUANT[q][1 if qat else 0]
            lines.append(_row([f"{run.exp.label} (`{run.folder}`)", q, fmt("steps", v.get("bits_per_number")),
                               fmt("loss", v.get("loss")), fmt("bpb", v.get("bpb")),
                               fmt("loss", v.get("normalized_loss")), fmt("bpb", v.get("total_bpb")),
                               pub, says or "–"]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def draw_curves(section_key: str, section: Section, rows: Sequence[Run], path: str) -> bool:
    """One axis per curve tag, one line per run that logged it; False when no run has a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = [r for r in rows if any(t in r.scalars for t in section.curves)]
    if not drawn or not section.curves:
        return False
    fig, axes = plt.subplots(1, len(section.curves), figsize=(5.5 * len(section.curves), 4), dpi=100,
                             squeeze=False)
    for ax, tag in zip(axes[0], section.curves):
        for i, run in enumerate(drawn):
            series = run.scalars.get(tag)
            if not series:
                continue
            scale = (_step_s(run) or float("nan")) if section.x == "time" else 1.0
            ax.plot([s * scale for s, _ in series], [v for _, v in series], color=f"C{i % 10}",
                    label=run.exp.name, marker="." if len(series) < 30 else None)
        ax.set_title(tag)
        ax.set_xlabel("training time (s, step × median s/step)" if section.x == "time" else "step")
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no run logged it", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(section.title)
    fig.tight_layout()
    curves.save_figure(fig, plt, path, "png")
    return True


# --------------------------------------------------------------------------- the page


def page_text(out: str, figures: str, page_dir: str, experiments: Sequence[Experiment] = EXPERIMENTS,
              shown: str | None = None) -> tuple[str, list[str]]:
    """(markdown, figure paths written) of the results in ``out``; figure links relative to
    ``page_dir``; folders shown as ``shown`` (default: ``out`` as given)."""
    shown = (shown or out).rstrip("/")
    by_name = {e.name: e for e in experiments}
    runs = {e.name: load_run(out, e, shown) for e in experiments}
    machine = read_json(os.path.join(out, MACHINE_FILE)) or {}
    walls = [r.sweep.get("wall_s", 0.0) for r in runs.values() if r.sweep]
    parts = [_machine_line(machine, sum(walls), len(walls), len(runs))]
    written = []
    os.makedirs(figures, exist_ok=True)
    for key, section in SECTIONS.items():
        rows = [runs[n] for n in section.also if n in runs] + [runs[e.name] for e in experiments
                                                                if e.section == key]
        if not rows:
            continue
        parts.append(f"### {section.title}\n\n{section.intro}\n")
        parts.append(quant_table(rows) if key == "quant" else section_table(section, rows, runs))
        fig = os.path.join(figures, f"{key}.png")
        if section.curves and draw_curves(key, section, rows, fig):
            written.append(fig)
            parts.append(f"\n![{section.title}]({os.path.relpath(fig, page_dir)})")
        parts.append("")
    missing = [r.folder for r in runs.values() if absent_text(r) or r.state != "finished"]
    parts.append(f"Runs without a complete result ({len(missing)} of {len(by_name)}): "
                 + (", ".join(f"`{m}`" for m in missing) if missing else "none") + ".")
    return "\n".join(parts).rstrip() + "\n", written


def _machine_line(machine: dict, wall_s: float, runs_with_time: int, total: int) -> str:
    cores = machine.get("cpu_count", "?")
    cpu = machine.get("cpu_model", "unknown CPU")
    rate = machine.get("matmul_gflops")
    rate_text = f", XLA 1024×1024 fp32 matmul {rate:.1f} GFLOP/s" if rate else ""
    libs = f", jax {machine['jax']}" if machine.get("jax") else ""
    return (f"The sweep took **{format_duration(wall_s)}** of wall time in all ({runs_with_time} of "
            f"{total} runs timed) on {cores} cores ({cpu}{rate_text}{libs}).\n")


def write_page(out: str, page: str, figures: str, experiments: Sequence[Experiment] = EXPERIMENTS,
               shown: str | None = None) -> list[str]:
    """Writes the results into ``page`` between the markers (the file fresh when it has none);
    returns the figures written."""
    text, written = page_text(out, figures, os.path.dirname(os.path.abspath(page)), experiments, shown)
    block = f"{BEGIN}\n{text}{END}\n"
    try:
        with open(page, encoding="utf-8") as f:
            old = f.read()
    except OSError:
        old = ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):].lstrip("\n")
    else:
        new = "# Results\n\n" + block
    write_atomic(page, new)
    return written
