"""The analysis probes of ``python -m mixers_jax.probe`` over a workdir (docs/analysis.md): load the
run (or fresh weights of its config), pick the rows or the text, run the probe, write JSON and a
figure. The math is in mixers_jax/inversion.py, entropy.py and attribution.py.

Every check of the input (model kind, depth, text length, memory slot, output format) happens
before anything is written; outputs are written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax import attribution, entropy, figures, inversion
from mixers_jax.config import field, input_length
from mixers_jax.errors import UserError
from mixers_jax.evaluation import eval_rows, held_out_paragraph
from mixers_jax.fileio import read_bytes
from mixers_jax.workdir import load_config, load_run, load_untrained


@dataclasses.dataclass
class Loaded:
    workdir: str
    config: Any
    model: Any
    params: Any
    tokenizer: Any
    label: str  # "<config name> step N" or "<config name> untrained"


def load(workdir: str, untrained: bool = False) -> Loaded:
    """The trained run in ``workdir``, or (``untrained``) fresh parameters of its config drawn from
    its ``seed`` the way training initialises them (the checkpoints are not read)."""
    run = load_untrained(workdir) if untrained else load_run(workdir)
    label = f"{run.config.name} " + ("untrained" if untrained else f"step {run.step}")
    return Loaded(run.workdir, run.config, run.model, run.params, run.tokenizer, label)


def outputs(out: str, *exts: str) -> list[str]:
    """``out + ext`` for each extension, checked writable as figures where they are images."""
    paths = [out + e for e in exts]
    for p in paths:
        if p.endswith(".png"):
            figures.check_image_path(p)
        parent = os.path.dirname(os.path.abspath(p))
        if os.path.exists(parent) and not os.path.isdir(parent):
            raise UserError(f"cannot write {p}: {parent} is not a folder")
    return paths


def read_results(paths: Sequence[str]) -> list[dict]:
    """Earlier inversion results (``--include``) to show beside this one."""
    out = []
    for p in paths:
        try:
            obj = json.loads(read_bytes(p))
            out.extend(obj["results"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{p} is not an inversion result (JSON with 'results')") from None
    return out


# --------------------------------------------------------------------------- inversion


def combine_results(include: Sequence[str], out: str | None) -> list[dict]:
    """Earlier inversion results together; with ``out`` written as ``out.json`` and ``out.png``."""
    paths = outputs(out, ".json", ".png") if out else []
    results = read_results(include)
    if paths:
        figures.write_json({"results": results}, paths[0])
        inversion.plot(results, paths[1])
    return results


def inversion_probe(workdir: str, untrained: bool, depths: Sequence[int] | None, samples: int,
                    schedule: inversion.Schedule, seed: int, out: str | None,
                    include: Sequence[str] = (), log=print) -> list[dict]:
    """Normalized Hamming error per depth for ``samples`` validation rows; with ``out`` writes
    ``out.json`` (this result and the included ones) and ``out.png`` (all of them)."""
    config = load_config(workdir) if os.path.isdir(workdir) else None
    if config is None:
        raise UserError(f"workdir {os.path.abspath(workdir)} does not exist")
    n_layers = inversion.check_invertible(config.model)
    depths = inversion.check_depths(depths or range(1, n_layers + 1), n_layers)
    earlier = read_results(include)
    paths = outputs(out, ".json", ".png") if out else []
    run = load(workdir, untrained)
    rows = eval_rows(run.config, run.tokenizer, max_rows=samples).rows
    valid = rows != run.tokenizer.pad_id
    log(f"{run.label}: inverting {len(rows)} rows x {rows.shape[1]} tokens, depths {depths}, "
        f"{schedule.steps} steps, lr {schedule.lr} -> {schedule.lr_end}")

    def show(rec):
        log(f"  k={rec['depth']}: error {rec['error']:.4f} over {rec['tokens']} tokens "
            f"(L1 {rec['l1_start']:.4g} -> {rec['l1_final']:.4g})")

    records = inversion.invert_depths(run.model, run.params, rows, valid, depths, schedule, seed,
                                      log=show)
    result = {"label": run.label, "workdir": run.workdir, "kind": str(run.config.model.kind),
              "untrained": bool(untrained), "rows": int(len(rows)), "row_length": int(rows.shape[1]),
              "steps": schedule.steps, "lr": [schedule.lr, schedule.lr_end], "seed": seed,
              "records": records}
    results = earlier + [result]
    if paths:
        figures.write_json({"results": results}, paths[0])
        inversion.plot(results, paths[1])
    return results


# --------------------------------------------------------------------------- text


def text_tokens(run: Loaded, text: str | None, limit: int) -> tuple[list[int], str]:
    """(tokens, source) of ``text``, or of the held-out paragraph cut to ``limit`` tokens; a given
    text longer than ``limit`` is a ``UserError``."""
    if text is None:
        ids = run.tokenizer.encode(held_out_paragraph(run.config))[:limit]
        return ids, "held-out paragraph (validation split)"
    ids = run.tokenizer.encode(text)
    if len(ids) > limit:
        raise UserError(f"the text has {len(ids)} tokens, longer than the context allows "
                        f"({limit} tokens for this model and probe)")
    if not ids:
        raise UserError("the text is empty")
    return ids, "--text"


def pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    return [figures.display_piece(tokenizer.id_to_piece(int(i)), tokenizer.decode([int(i)]))
            for i in ids]


# --------------------------------------------------------------------------- entropy


def entropy_probe(workdir: str, text: str | None, out: str, short_workdir: str | None = None,
                  log=print) -> dict:
    """Per-position entropies of ``text`` (shifting method; the two-model form with
    ``short_workdir``); writes ``out.json`` and ``out.png``."""
    for w in (workdir, short_workdir):
        if w is not None and not os.path.isdir(w):
            raise UserError(f"workdir {os.path.abspath(w)} does not exist")
    n_long = entropy.check_entropy_model(load_config(workdir).model)
    n_short = entropy.check_entropy_model(load_config(short_workdir).model) if short_workdir else None
    paths = outputs(out, ".json", ".png")
    run = load(workdir)
    short = load(short_workdir) if short_workdir else None
    if short is not None and short.tokenizer.serialized() != run.tokenizer.serialized():
        raise UserError("the two models of the two-model form must share a tokenizer")
    ids, source = text_tokens(run, text, entropy.max_text_tokens(n_long, n_short))
    pad = run.tokenizer.pad_id

    def sum_fn(r: Loaded):
        return entropy.summed_nll_fn(lambda t: r.model.apply({"params": r.params}, t), pad)

    res = entropy.conditional_entropies(ids, pad, sum_fn(run), n_long,
                                        sum_fn(short) if short else None, n_short)
    h = res["entropy"]
    form = "two-model" if short else "shifting"
    words = pieces(run.tokenizer, ids)
    record = {"method": form, "model": run.label, "workdir": run.workdir,
              "short_model": short.label if short else None, "text_source": source,
              "text": run.tokenizer.decode(ids), "tokens": [int(i) for i in ids], "pieces": words,
              "entropy_nats": h.tolist(), "s_long": res["s_long"].tolist(),
              "s_short": res["s_short"].tolist(), "total_nats": float(h.sum()),
              "mean_nats": float(h.mean())}
    figures.write_json(record, paths[0])
    figures.token_heatmap(words, [(f"entropy per token (nats), {form} method", h.tolist())], paths[1],
                          title=f"{run.label}: {len(ids)} tokens, mean {h.mean():.3f} nats")
    log(f"{run.label} ({form}): {len(ids)} tokens, total {h.sum():.2f} nats, mean "
        f"{h.mean():.3f} nats/token, min {h.min():.3f}, max {h.max():.3f}; wrote {paths[0]}, {paths[1]}")
    return record


# --------------------------------------------------------------------------- attribution

METHODS = (("l1", "occlusion L1"), ("cos", "occlusion 1 - cos"), ("grad_x_input", "gradient x input"),
           ("noise", "noise shift (+U(0,1)/4)"))


def attribution_probe(workdir: str, text: str | None, out: str, slot: int = 0, seed: int = 0,
                      log=print) -> dict:
    """Occlusion (L1, 1 − cos), gradient × input and noise shift of memory slot ``slot`` over the
    tokens of ``text``; writes ``out.json`` and the heatmap ``out.png``."""
    if not os.path.isdir(workdir):
        raise UserError(f"workdir {os.path.abspath(workdir)} does not exist")
    config = load_config(workdir)
    attribution.memory_access(config.model, None)  # no memory: stop before loading
    slots = int(field(config.model, "chunks")) - 1 if config.model.kind == "memory" else 1
    if not 0 <= slot < slots:
        raise UserError(f"memory slot {slot} does not exist: the model has slots 0..{slots - 1}")
    paths = outputs(out, ".json", ".png")
    run = load(workdir)
    access = attribution.memory_access(run.config.model, attribution.bare_apply(run.model))
    length = input_length(run.config.model)
    ids, source = text_tokens(run, text, length)
    pad = run.tokenizer.pad_id
    row = np.full((1, length), pad, np.int32)
    row[0, : len(ids)] = ids
    scores = jax.jit(lambda p, t: attribution.all_scores(access, p, t, pad, slot, seed))(
        run.params, jnp.asarray(row))
    on_tokens = {k: np.asarray(v[0, : len(ids)], np.float64) for k, v in scores["on_tokens"].items()}
    raw = {k: np.asarray(v[0, : len(ids)], np.float64) for k, v in scores["raw"].items()}

    def finite(a):
        return [float(x) if np.isfinite(x) else None for x in a]

    words = pieces(run.tokenizer, ids)
    record = {"model": run.label, "workdir": run.workdir, "slot": slot, "text_source": source,
              "text": run.tokenizer.decode(ids), "tokens": [int(i) for i in ids], "pieces": words,
              "note": "on_tokens[j]: normalized score of the output that predicts token j",
              "on_tokens": {k: finite(v) for k, v in on_tokens.items()},
              "raw_per_output": {k: finite(v) for k, v in raw.items()}}
    figures.write_json(record, paths[0])
    panels = [(f"{label} (min-max normalized)", finite(on_tokens[k])) for k, label in METHODS]
    figures.token_heatmap(words, panels, paths[1],
                          title=f"{run.label}: attribution to memory slot {slot}")
    log(f"{run.label}: attribution to memory slot {slot} over {len(ids)} tokens; mean normalized "
        + ", ".join(f"{k} {np.nanmean(on_tokens[k]):.3f}" for k, _ in METHODS)
        + f"; wrote {paths[0]}, {paths[1]}")
    return record
