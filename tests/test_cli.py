"""The training command line end to end: a smoke run, SIGTERM, and every bad input.

Each bad input must give one line on stderr naming the problem, a non-zero exit, and leave the
workdir exactly as it was (absent, or unchanged).
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from mixers_jax import workdir as workdir_lib
from tests_util import REPO, config_path, snapshot, xla_flags_with_devices

SMOKE = config_path("mixer_clm", "smoke")


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = xla_flags_with_devices(None)  # a user's machine: one CPU device
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _train(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "mixers_jax.train", *args],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


def _assert_one_line_error(proc, pattern):
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr
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
    before = snapshot(workdir)
    proc = _train(f"--config={SMOKE}", f"--workdir={workdir}", "--config.model.d_model=64")
    _assert_one_line_error(proc, r"holds a different model.*model\.d_model=32 \(saved\) vs 64")
    assert snapshot(workdir) == before


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


def _start_long_run(workdir, *args):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mixers_jax.train", f"--config={SMOKE}", f"--workdir={workdir}",
         "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000", *args],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 240
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") or time.time() > deadline:
            break
    return proc, lines


def test_sigterm_saves_exits_75_and_rerun_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    proc, lines = _start_long_run(workdir)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    stdout = "".join(lines) + out
    assert proc.returncode == 75, err[-3000:]
    assert "SIGTERM: saved step" in stdout, stdout
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("preempted: saved step")
    saved = os.listdir(os.path.join(workdir, "checkpoints"))
    assert len(saved) == 1 and 0 < int(saved[0]) < 100000
    # the scheduler's rerun (here with a total two steps further, so that it ends soon) resumes
    total = int(saved[0]) + 2
    done = _train(f"--config={SMOKE}", f"--workdir={workdir}", f"--config.train.steps={total}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {saved[0]}" in done.stdout and f"done: {total} steps" in done.stdout


def test_second_run_on_a_live_workdir_fails_fast_readers_read_and_ctrl_c_saves(tmp_path):
    """Two real processes: the live run holds the workdir; a second train fails in one line (exit 2)
    without touching it; a reader (load_run) reads a complete checkpoint; Ctrl-C saves, exits 75."""
    workdir = str(tmp_path / "run")
    proc, lines = _start_long_run(workdir, "--config.train.checkpoint_every=2")
    try:
        deadline = time.time() + 120  # until a first checkpoint is complete
        while not workdir_lib.checkpoint_steps(workdir) and time.time() < deadline:
            time.sleep(0.2)
        ckpt_dir = os.path.join(workdir, "checkpoints")
        config_before = snapshot(os.path.join(workdir, "config.json"))
        t0 = time.time()
        second = _train(f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.steps=7")
        assert second.returncode == 2, second.stderr[-3000:]
        _assert_one_line_error(second, rf"^error: workdir {re.escape(workdir)} is in use by pid "
                                       rf"{proc.pid} on ")
        assert time.time() - t0 < 60
        assert snapshot(os.path.join(workdir, "config.json")) == config_before
        run = workdir_lib.load_run(workdir)  # never waits for, nor takes, the lock
        assert os.path.isfile(os.path.join(ckpt_dir, str(run.step), "mixers_jax_integrity.json"))
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "SIGINT: saved step" in "".join(lines) + out
    assert "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("preempted: saved step"), err
    assert not os.path.exists(os.path.join(workdir, "run.lock"))  # released at the end


def test_config_file_with_a_syntax_error(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def get_config():\n    return dict(a=(1, 2\n")
    proc = _train(f"--config={bad}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2
    _assert_one_line_error(proc, rf"config file {re.escape(str(bad))}: SyntaxError: .* \(line 2\)")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- every command


COMMANDS = ("train", "evaluate", "generate", "compress", "inspect", "plot", "profile", "bench")


@pytest.mark.parametrize("command", COMMANDS)
def test_unknown_flag_is_one_line_status_2(command):
    proc = subprocess.run([sys.executable, "-m", f"mixers_jax.{command}", "--no_such_flag=1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: Unknown command line flag 'no_such_flag'", proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_exits_0(command):
    proc = subprocess.run([sys.executable, "-m", f"mixers_jax.{command}", "--help"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"python -m mixers_jax.{command}" in proc.stdout and "flags:" in proc.stdout


def _status(main, argv, capsys, **kwargs):
    from absl import flags

    from mixers_jax import cli

    fv = cli.flag_values()
    flags.DEFINE_string("name", None, "A name.", flag_values=fv)
    with pytest.raises(SystemExit) as e:
        cli.run(main, fv, argv=["prog", *argv], **kwargs)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_cli_run_maps_outcomes_to_exit_statuses(capsys):
    from mixers_jax.errors import Preempted, UserError

    def raising(exc):
        def main(argv):
            raise exc
        return main

    assert _status(lambda argv: None, ["--name=x"], capsys) == (0, [])
    assert _status(raising(UserError("bad data")), [], capsys) == (2, ["error: bad data"])
    assert _status(raising(Preempted("saved step 3")), [], capsys) == (75, ["preempted: saved step 3"])
    assert _status(raising(KeyboardInterrupt()), [], capsys) == (130, ["interrupted"])
    disk_full = OSError(28, "No space left on device", "/data/out.bin")
    assert _status(raising(disk_full), [], capsys) == (
        1, ["error: /data/out.bin: No space left on device"])
    assert _status(lambda argv: None, [], capsys, required=("name",)) == (
        2, ["error: --name is required"])
    assert _status(lambda argv: None, ["a"], capsys) == (2, ["error: unexpected arguments: a"])
    assert _status(lambda argv: None, ["a"], capsys, positional=("IN", "OUT")) == (
        2, ["error: missing arguments: expected IN OUT"])
    got = []
    assert _status(lambda argv: got.append(argv), ["a", "--name=n", "b"], capsys,
                   positional=("IN", "OUT")) == (0, [])
    assert got == [["prog", "a", "b"]]
    with pytest.raises(RuntimeError, match="internal"):  # an internal error keeps its traceback
        _status(raising(RuntimeError("internal")), [], capsys)


_ALLOCATION_CYCLES = """
import resource, sys
import numpy as np
from mixers_jax import cli
applied = cli.reuse_host_memory()
def cycle():
    a = np.empty(64 << 20, np.uint8)  # 64 MiB, above glibc's largest mmap threshold
    a[::4096] = 1  # touch every page
    del a
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    cycle()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_reuse_host_memory_keeps_freed_blocks_for_the_next_allocation():
    """cli.reuse_host_memory: a large block freed and allocated again is not faulted in anew (as
    XLA:CPU's per-step temporaries); MIXERS_JAX_HOST_MALLOC=system keeps glibc's defaults."""
    def faults(mode):
        env = dict(os.environ, MIXERS_JAX_HOST_MALLOC=mode, PYTHONPATH=REPO)
        out = subprocess.run([sys.executable, "-c", _ALLOCATION_CYCLES], env=env, check=True,
                             capture_output=True, text=True).stdout.split()
        return out[0], int(out[1])

    assert faults("system")[0] == "False"
    applied, reused = faults("reuse")
    _, fresh = faults("system")
    assert applied == "True"
    assert fresh >= 3 * 32  # each cycle faults its pages in again (32 when they are 2 MiB pages)
    assert reused < fresh / 10
