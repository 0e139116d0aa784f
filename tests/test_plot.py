"""plot: event files written by the trainer's writer are read back exactly (resumed runs merged,
truncated tails ignored); the CLI writes a PNG and a CSV of the logged points; bad input exits 2."""
import csv
import json
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from mixers_jax import curves, plot
from mixers_jax.config import base_config
from mixers_jax.metrics import Writer
from tests_util import exit_status


def _f32(x: float) -> float:
    return float(np.float32(x))  # tensorboard scalars are stored as float32


def _make_run(path, name, logs, **model):
    """A workdir with config.json and one tb event file per entry of ``logs`` ({step: {tag: v}})."""
    os.makedirs(path)
    c = base_config()
    c.name = name
    c.model.update(model)
    c.train.batch_size = 4
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(c.to_dict(), f)
    for i, log in enumerate(logs):
        if i:
            time.sleep(1.05)  # a resumed run: a new event file with a later time stamp
        w = Writer(os.path.join(path, "tb"))
        for step, values in log.items():
            w.scalars(step, values)
        w.close()
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("plot")
    first = {s: {"train/loss": 6.0 / s, "eval/loss": 6.5 / s, "eval/bpb": 3.0 / s} for s in (1, 2, 3, 4)}
    resumed = {s: {"train/loss": 5.0 / s, "eval/loss": 5.5 / s, "eval/bpb": 2.0 / s} for s in (3, 4, 5)}
    a = _make_run(root / "a", "mixer_clm-smoke", [first, resumed], kind="mixer", n_ctx=32, d_model=32,
                  n_layers=2)
    b = _make_run(root / "b", "transformer_clm-smoke",
                  [{s: {"train/loss": 7.0 / s, "eval/loss": 7.5 / s} for s in (2, 4, 6)}],
                  kind="transformer", n_ctx=32, d_model=32, n_layers=2, n_heads=2)
    expected = {
        a: {"train/loss": [(1, 6.0), (2, 3.0), (3, 5.0 / 3), (4, 1.25), (5, 1.0)],
            "eval/loss": [(1, 6.5), (2, 3.25), (3, 5.5 / 3), (4, 1.375), (5, 1.1)]},
        b: {"train/loss": [(2, 3.5), (4, 1.75), (6, 7.0 / 6)], "eval/loss": [(2, 3.75), (4, 1.875), (6, 1.25)]},
    }
    return a, b, expected


def test_read_scalars_merges_resumed_logs(runs, tmp_path):
    a, _, expected = runs
    got = curves.read_scalars(os.path.join(a, "tb"))
    assert len(curves.event_files(os.path.join(a, "tb"))) == 2
    for tag, points in expected[a].items():  # the resumed file's steps 3, 4 replace the first's
        assert got[tag] == [(s, _f32(v)) for s, v in points]
    # A record cut short (a run still writing) is ignored; the records before it are kept.
    last = curves.event_files(os.path.join(a, "tb"))[-1]
    data = Path(last).read_bytes()
    cut = tmp_path / "tb"
    cut.mkdir()
    (cut / os.path.basename(last)).write_bytes(data[:-7])
    partial = curves.read_scalars(str(cut))
    assert partial["train/loss"] == [(s, _f32(5.0 / s)) for s in (3, 4, 5)]
    assert partial["eval/bpb"] == [(3, _f32(2.0 / 3)), (4, _f32(0.5))]  # step 5's eval/bpb was last
    # The framing is the TFRecord one: u64 length, masked crc, payload, masked crc.
    (length,) = struct.unpack("<Q", data[:8])
    assert len(data) >= 16 + length


def test_labels():
    c = base_config().to_dict()
    c["name"] = "ae"
    assert curves.run_label(c) == "ae: mixer d512 L8 flat"
    c["model"].update(kind="autoencoder", compression=4, kernel=8)
    c["model"]["encoder"].update(kind="transformer", d_model=256, n_heads=4)
    assert curves.run_label(c) == "ae: autoencoder enc transformer d256 L8 H4 / dec mixer d512 L8 flat k8 c4"
    c["model"].update(kind="rmt")
    assert curves.run_label(c).startswith("ae: rmt dec mixer d512 L8")


def test_cli_png_and_csv_points(runs, tmp_path, capsys):
    a, b, expected = runs
    out, table = tmp_path / "fig.png", tmp_path / "points.csv"
    rc = exit_status(plot, ["plot", f"--workdirs={a},{b}", "--metric=eval/loss,train/loss", f"--out={out}",
                    f"--csv={table}", "--x=tokens", "--logy"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert printed.err == "" and "2 metric(s), 2 run(s)" in printed.out
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 0 and height > 0 and len(png) > 1000
    with open(table, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = {a: "mixer_clm-smoke: mixer d32 L2 flat", b: "transformer_clm-smoke: transformer d32 L2 H2"}
    tokens_per_step = 4 * 32
    want = [(labels[wd], wd, metric, s, s * tokens_per_step, _f32(v))
            for metric in ("eval/loss", "train/loss") for wd in (a, b) for s, v in expected[wd][metric]]
    got = [(r["label"], r["workdir"], r["metric"], int(r["step"]), int(r["x"]), float(r["value"]))
           for r in rows]
    assert got == want


def test_cli_custom_labels_and_partly_missing_metric(runs, tmp_path, capsys):
    a, b, _ = runs
    out, table = tmp_path / "bpb.png", tmp_path / "bpb.csv"
    rc = exit_status(plot, ["plot", f"--workdirs={a},{b}", "--metric=eval/bpb", f"--out={out}",
                    "--labels=mixer,transformer", f"--csv={table}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0 and out.stat().st_size > 0
    assert err == ["warning: eval/bpb is not logged by transformer"]
    with open(table, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["label"] for r in rows} == {"mixer"} and [int(r["x"]) for r in rows] == [1, 2, 3, 4, 5]


def _bad(argv, capsys, out, status=2):
    rc = exit_status(plot, ["plot", *argv, f"--out={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == status and len(err) == 1 and err[0].startswith("error: "), err
    assert not os.path.exists(out) or os.path.isdir(out)
    return err[0]


def test_cli_bad_input(runs, tmp_path, capsys):
    a, b, _ = runs
    out = tmp_path / "never.png"
    both = f"--workdirs={a},{b}"
    assert "no run logged 'eval/nope'" in _bad([both, "--metric=eval/nope"], capsys, out)
    assert "does not exist" in _bad([f"--workdirs={a},{tmp_path / 'gone'}"], capsys, out)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps(base_config().to_dict()))
    assert "no tensorboard logs" in _bad([f"--workdirs={bare}"], capsys, out)
    assert "--labels has 1 names for 2 workdirs" in _bad([both, "--labels=x"], capsys, out)
    assert "unknown image format" in _bad([both], capsys, tmp_path / "fig.xyz")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # an OSError (here: a file where a folder should be) is one line with status 1
    assert str(blocker / "fig.png") in _bad([both], capsys, blocker / "fig.png", status=1)
    folder = tmp_path / "figs.png"
    folder.mkdir()
    assert "is a folder" in _bad([both], capsys, folder)
    assert "Unknown command line flag" in _bad([both, "--colour=red"], capsys, out)
    assert "--workdirs is required" in _bad([], capsys, out)
    assert "unexpected arguments: extra" in _bad([both, "extra"], capsys, out)
