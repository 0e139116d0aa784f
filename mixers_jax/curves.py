"""Training curves of several runs side by side (the library of ``python -m mixers_jax.plot``).

One axis per metric, one line per run, the way the published figures compare mixers and
transformers. The curves are the scalars the trainer logs with tensorboardX under
``<workdir>/tb`` (``train/loss``, ``eval/loss``, ``eval/bpb``, ``perf/tokens_per_s``, ...), read
without TensorFlow: TFRecord framing (u64 length, masked CRC-32C of the length, the serialized
``Event`` protobuf, masked CRC-32C of the data) decoded with the protobuf classes tensorboardX ships.
Every event file of a run is read in the order it was written; a step logged twice (a resumed run
repeats the steps after its last checkpoint) keeps the later value. A truncated last record (a run
still writing) is ignored.

Labels come from each run's ``config.json`` (the config name, then kind, encoder / decoder kinds of
composite models, width, depth, mixing) unless given. ``x="tokens"`` plots against training tokens
= step × train.batch_size × row length. The plotted points (label, workdir, metric, step, x, value)
are returned and can be written as CSV. A metric that no run logged, a missing workdir or log, or an
unknown image format raises UserError; a metric missing from only some runs prints a ``warning:``
line naming them; an unwritable output raises the OSError.
"""
from __future__ import annotations

import csv as csv_lib
import glob
import io
import json
import os
import struct
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from google.protobuf.message import DecodeError

from mixers_jax.config import base_config, input_length, sub_model_config
from mixers_jax.errors import UserError
from mixers_jax.fileio import read_bytes, write_atomic

EVENT_GLOB = "events.out.tfevents.*"
_SINGLE_KINDS = ("mixer", "transformer")
_DECODER_ONLY = ("rmt",)


# --------------------------------------------------------------------------- event files


def _records(data: bytes, path: str) -> Iterator[bytes]:
    """The payloads of a TFRecord byte string; stops at a truncated or corrupt record."""
    from tensorboardX.record_writer import masked_crc32c

    pos = 0
    while pos + 12 <= len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        if masked_crc32c(header) != header_crc:
            print(f"warning: {path}: corrupt record at byte {pos}; reading stops there", file=sys.stderr)
            return
        start, end = pos + 12, pos + 12 + length
        if end + 4 > len(data):
            return  # truncated: a run still writing
        payload = data[start:end]
        (data_crc,) = struct.unpack("<I", data[end:end + 4])
        if masked_crc32c(payload) != data_crc:
            print(f"warning: {path}: corrupt record at byte {pos}; reading stops there", file=sys.stderr)
            return
        yield payload
        pos = end + 4


def _value_of(v) -> float | None:
    kind = v.WhichOneof("value")
    if kind == "simple_value":
        return float(v.simple_value)
    if kind == "tensor":
        t = v.tensor
        for field in ("float_val", "double_val", "int64_val", "int_val"):
            vals = getattr(t, field)
            if len(vals) == 1:
                return float(vals[0])
        dtypes = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64}
        if t.tensor_content and t.dtype in dtypes:
            arr = np.frombuffer(t.tensor_content, dtypes[t.dtype])
            if arr.size == 1:
                return float(arr[0])
    return None


def event_files(logdir: str) -> list[str]:
    """Event files under ``logdir`` in the order they were written (their creation time stamp)."""

    def key(path: str):
        parts = os.path.basename(path).split(".")
        stamp = int(parts[3]) if len(parts) > 3 and parts[3].isdigit() else 0
        return stamp, path

    return sorted(glob.glob(os.path.join(logdir, "**", EVENT_GLOB), recursive=True), key=key)


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...] sorted by step} of every scalar in the event files under ``logdir``."""
    from tensorboardX.proto import event_pb2

    series: dict[str, dict[int, float]] = {}
    for path in event_files(logdir):
        for payload in _records(read_bytes(path), path):
            event = event_pb2.Event()
            try:
                event.ParseFromString(payload)
            except DecodeError:
                print(f"warning: {path}: a record is not an Event; skipped", file=sys.stderr)
                continue
            if not event.HasField("summary"):
                continue
            for v in event.summary.value:
                value = _value_of(v)
                if value is not None:
                    series.setdefault(v.tag, {})[int(event.step)] = value
    return {tag: sorted(points.items()) for tag, points in series.items()}


# --------------------------------------------------------------------------- runs


def _describe(m: dict) -> str:
    text = f"{m.get('kind')} d{m.get('d_model')} L{m.get('n_layers')}"
    if m.get("kind") == "mixer":
        text += f" {m.get('mixing', 'flat')}"
        if m.get("heads"):
            text += f" H{m.get('heads')}"
        if (m.get("kernel") or 1) > 1:
            text += f" k{m.get('kernel')}"
    elif m.get("kind") == "transformer":
        text += f" H{m.get('n_heads')}"
    if m.get("mlp_ratio") not in (None, 4):
        text += f" r{m.get('mlp_ratio')}"
    return text


def run_label(config: dict) -> str:
    """'name: kind d L mixing' from a saved config (composite kinds: encoder / decoder kinds)."""
    m = config.get("model", {})
    kind = m.get("kind", "mixer")
    if kind in _SINGLE_KINDS:
        body = _describe(m)
    else:
        roles = ("decoder",) if kind in _DECODER_ONLY else ("encoder", "decoder")
        subs = [f"{role[:3]} {_describe(sub_model_config(m, role))}" for role in roles]
        body = f"{kind} " + " / ".join(subs)
        if int(m.get("compression", 1) or 1) > 1:
            body += f" c{m.get('compression')}"
    return f"{config.get('name', 'run')}: {body}"


def tokens_per_step(config: dict) -> int:
    """Training tokens per optimizer step: train.batch_size × row length (input_length)."""
    model = dict(base_config().model.to_dict(), **config.get("model", {}))
    batch = int(config.get("train", {}).get("batch_size", base_config().train.batch_size))
    return batch * input_length(model)


def load_runs(workdirs: Sequence[str]) -> list[dict]:
    """[{workdir, config, scalars}] for each workdir; UserError naming a missing one or its logs."""
    runs = []
    for wd in workdirs:
        if not os.path.isdir(wd):
            raise UserError(f"workdir {wd} does not exist")
        path = os.path.join(wd, "config.json")
        try:
            config = json.loads(read_bytes(path).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        except UserError:
            raise UserError(f"{wd} is not a training workdir (no config.json)") from None
        logdir = os.path.join(wd, "tb")
        if not event_files(logdir):
            raise UserError(f"{wd} has no tensorboard logs (no {EVENT_GLOB} under {logdir})")
        runs.append({"workdir": wd, "config": config, "scalars": read_scalars(logdir)})
    return runs


# --------------------------------------------------------------------------- figure


def plot_runs(
    workdirs: Sequence[str],
    metrics: Sequence[str],
    out: str,
    *,
    labels: Sequence[str] | None = None,
    x: str = "step",
    logy: bool = False,
    csv: str | None = None,
) -> list[dict]:
    """Draws ``metrics`` of ``workdirs`` into ``out``; returns the plotted points (CSV rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not workdirs:
        raise UserError("--workdirs is empty")
    if not metrics:
        raise UserError("--metric is empty")
    if x not in ("step", "tokens"):
        raise UserError(f"--x must be 'step' or 'tokens', got {x!r}")
    if labels and len(labels) != len(workdirs):
        raise UserError(f"--labels has {len(labels)} names for {len(workdirs)} workdirs")
    fmt = image_format(out, plt)

    runs = load_runs(workdirs)
    names = list(labels) if labels else [run_label(r["config"]) for r in runs]
    for i, name in enumerate(names):  # the same label twice: tell the runs apart by folder
        if names.count(name) > 1 and not labels:
            names[i] = f"{name} [{os.path.basename(os.path.normpath(runs[i]['workdir']))}]"
    for metric in metrics:
        missing = [n for n, r in zip(names, runs) if metric not in r["scalars"]]
        if len(missing) == len(runs):
            known = sorted({t for r in runs for t in r["scalars"]})
            raise UserError(f"no run logged {metric!r}; logged: {', '.join(known) or 'nothing'}")
        if missing:
            print(f"warning: {metric} is not logged by {', '.join(missing)}", file=sys.stderr)

    points = []
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), dpi=100, squeeze=False)
    colors = [f"C{i % 10}" for i in range(len(runs))]  # one colour per run on every axis
    handles = {}
    for ax, metric in zip(axes[0], metrics):
        for name, run, color in zip(names, runs, colors):
            series = run["scalars"].get(metric)
            if not series:
                continue
            scale = tokens_per_step(run["config"]) if x == "tokens" else 1
            steps = [s for s, _ in series]
            xs = [s * scale for s in steps]
            ys = [v for _, v in series]
            (handles[name],) = ax.plot(xs, ys, color=color, marker="." if len(xs) < 30 else None)
            points.extend({"label": name, "workdir": run["workdir"], "metric": metric, "step": s,
                           "x": xv, "value": v} for s, xv, v in zip(steps, xs, ys))
        ax.set_title(metric)
        ax.set_xlabel("training tokens" if x == "tokens" else "step")
        ax.set_ylabel(metric)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    # One legend for all axes, below them: run labels are long (kind, widths, depths, mixing).
    legend = fig.legend(list(handles.values()), list(handles), loc="upper center", fontsize=8,
                        bbox_to_anchor=(0.5, 0.0), ncol=1, frameon=False)
    save_figure(fig, plt, out, fmt, legend)
    if csv:
        write_atomic(csv, points_csv(points))
    return points


def image_format(out: str, plt) -> str:
    """The image format of ``out`` (its extension); UserError for a folder or an unknown format."""
    if os.path.isdir(out):
        raise UserError(f"--out={out} is a folder; give a file name such as fig.png")
    fmt = os.path.splitext(out)[1].lstrip(".").lower()
    fig = plt.figure()
    supported = fig.canvas.get_supported_filetypes()
    plt.close(fig)
    if fmt not in supported:
        raise UserError(f"--out={out}: unknown image format {fmt!r}; use one of: {', '.join(sorted(supported))}")
    return fmt


def save_figure(fig, plt, out: str, fmt: str, legend=None) -> None:
    """Writes ``fig`` to ``out`` atomically and closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_extra_artists=(legend,) if legend else None,
                bbox_inches="tight")
    plt.close(fig)
    write_atomic(out, buf.getvalue())


def plot_pools(results: Sequence[str], out: str, labels: Sequence[str] | None = None) -> list[dict]:
    """Top-1 accuracy vs pool size of retrieval evaluations (JSON files written by ``evaluate
    --retrieval --out``) into ``out``: one line per file, BM25 and chance of the first file dashed;
    returns the plotted points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise UserError("--pools is empty")
    if labels and len(labels) != len(results):
        raise UserError(f"--labels has {len(labels)} names for {len(results)} result files")
    fmt = image_format(out, plt)
    loaded = []
    for path in results:
        try:
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        if not isinstance(r, dict) or "pool_sizes" not in r or "model" not in r:
            raise UserError(f"{path} is not a retrieval evaluation (evaluate --retrieval --out)")
        loaded.append(r)
    names = list(labels) if labels else [
        f"{r.get('model_kind', '?')} ({os.path.basename(os.path.normpath(r.get('workdir', p)))})"
        for r, p in zip(loaded, results)]
    fig, ax = plt.subplots(figsize=(6, 4.2), dpi=100)
    points = []

    def line(sizes, acc, label, **style):
        ys = [100 * float(acc[str(p)] if str(p) in acc else acc[p]) for p in sizes]
        ax.plot(sizes, ys, label=label, marker=".", **style)
        points.extend({"label": label, "pool": p, "top1": y} for p, y in zip(sizes, ys))

    for name, r in zip(names, loaded):
        line(r["pool_sizes"], r["model"], name)
    first = loaded[0]
    if "bm25" in first:
        line(first["pool_sizes"], first["bm25"], "BM25", color="gray", linestyle="--")
    line(first["pool_sizes"], first["chance"], "chance", color="gray", linestyle=":")
    ax.set_xscale("log", base=2)
    sizes = sorted({int(p) for r in loaded for p in r["pool_sizes"]})
    ax.set_xticks(sizes, [str(p) for p in sizes])
    ax.set_xlabel("candidate pool size")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=8)
    save_figure(fig, plt, out, fmt, legend)
    return points


def points_csv(points: Sequence[dict]) -> str:
    """The plotted points as CSV (label, workdir, metric, step, x, value; values as repr floats)."""
    buf = io.StringIO()
    writer = csv_lib.writer(buf, lineterminator="\n")
    writer.writerow(["label", "workdir", "metric", "step", "x", "value"])
    for p in points:
        writer.writerow([p["label"], p["workdir"], p["metric"], p["step"], p["x"], repr(float(p["value"]))])
    return buf.getvalue()
