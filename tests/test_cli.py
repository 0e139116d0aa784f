"""The training command line end to end: a smoke run, SIGTERM, and every bad input.

Each bad input must give one line on stderr naming the problem, a non-zero exit, and leave the
workdir exactly as it was (absent, or unchanged).
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests_util import REPO, config_path

SMOKE = config_path("mixer_clm", "smoke")


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = ""  # a user's machine: one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "mixers_jax.train", *args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


def _snapshot(path):
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


def _assert_one_line_error(proc, pattern):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    import re

    assert re.search(pattern, errors[0]), errors[0]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("smoke") / "run")
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}")
    return workdir, proc


def test_smoke_run_end_to_end(smoke_run):
    workdir, proc = smoke_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step      6/6" in proc.stdout and "done: 6 steps" in proc.stdout, proc.stdout
    for name in ("config.json", "tokenizer.model", "results.json", "log.txt"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))


def test_rerun_of_finished_workdir_resumes_and_does_nothing(smoke_run):
    workdir, _ = smoke_run
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed" in proc.stdout and "at step 6" in proc.stdout


def test_resume_with_different_model_shape_is_refused(smoke_run):
    workdir, _ = smoke_run
    before = _snapshot(workdir)
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}", "--config.model.d_model=64")
    _assert_one_line_error(proc, r"holds a different model.*model\.d_model=32 \(saved\) vs 64")
    assert _snapshot(workdir) == before


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--config.model.d_modle=64"], r"unknown config key 'd_modle'"),
        (["--config.data.source=/no/such/corpus.txt"], r"/no/such/corpus\.txt"),
    ],
    ids=["unknown_key", "missing_data"],
)
def test_bad_input_leaves_no_workdir(tmp_path, args, pattern):
    workdir = str(tmp_path / "run")
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}", *args)
    _assert_one_line_error(proc, pattern)
    assert not os.path.exists(workdir)


def test_workdir_that_is_a_file_is_refused_and_left_alone(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("a file")
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.eval_every=0")
    _assert_one_line_error(proc, r"train\.eval_every must be positive")
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}")
    _assert_one_line_error(proc, rf"^error: workdir {workdir} is a file, not a folder$")
    assert sorted(os.listdir(tmp_path)) == ["run"] and workdir.read_text() == "a file"


def test_unknown_preset(tmp_path):
    workdir = str(tmp_path / "run")
    proc = _train(f"--config={config_path('mixer_clm', 'nope')}", f"--workdir={workdir}")
    _assert_one_line_error(proc, r"unknown preset 'nope'; choose one of")
    assert not os.path.exists(workdir)


def test_empty_data(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    workdir = str(tmp_path / "run")
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}", f"--config.data.source={empty}")
    _assert_one_line_error(proc, r"empty")
    assert not os.path.exists(workdir)


def test_corpus_smaller_than_one_window(tmp_path, smoke_run):
    # The smoke run's tokenizer lets the tiny corpus reach the window check.
    tokenizer = os.path.join(smoke_run[0], "tokenizer.model")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i, text in enumerate(["Just a few words.", "A second short text.", "And a third one."]):
        (tiny / f"{i}.txt").write_text(text)
    workdir = str(tmp_path / "run")
    proc = _train(
        f"--config={SMOKE}", f"--workdir={workdir}", f"--config.data.source={tiny}",
        f"--config.data.tokenizer_model={tokenizer}",
    )
    _assert_one_line_error(proc, r"too small")
    assert not os.path.exists(workdir)


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixers_jax.train", f"--config={SMOKE}", f"--workdir={workdir}",
         "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000"],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stdout = "".join(lines) + out
    assert proc.returncode == 0, err[-3000:]
    assert "SIGTERM: saved step" in stdout, stdout
    saved = os.listdir(os.path.join(workdir, "checkpoints"))
    assert len(saved) == 1 and 0 < int(saved[0]) < 100000
