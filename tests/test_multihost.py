"""Two local CPU processes (loopback coordinator, gloo collectives) train together.

1. Two processes with one CPU device each run the trainer's sharded train step over a global batch
   that each feeds half of; their losses equal one process's over the same global batch.
2. The training command itself runs as two processes in one workdir: only process 0 prints progress
   and writes logs, the checkpoints are written collectively, both finish.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from tests_util import REPO, config_path, exit_status, xla_flags_with_devices

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
STEPS = 3
TIMEOUT = 180


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = xla_flags_with_devices(devices)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_all(cmds, devices, meanwhile=None):
    """Runs ``cmds`` at once; ``meanwhile()`` (if given) runs here while they start up and train.
    Returns [(status, stdout, stderr)] and what ``meanwhile`` returned."""
    procs = [
        subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for cmd in cmds
    ]
    outs = []
    try:
        here = meanwhile() if meanwhile is not None else None
        for p in procs:
            out, err = p.communicate(timeout=TIMEOUT)
            outs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs, here


def _result(out):
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_two_processes_reach_the_loss_of_one_process():
    import jax
    from multihost_worker import losses

    coord = f"127.0.0.1:{_free_port()}"
    # The single-process reference (the same global batch on one process with two devices) is
    # computed here while the two processes run.
    two, one = _run_all(
        [[sys.executable, WORKER, coord, "2", str(i), str(STEPS)] for i in range(2)], devices=1,
        meanwhile=lambda: losses(STEPS, jax.devices()[:2]),
    )
    for rc, out, err in two:
        assert rc == 0, err[-3000:]
    results = [_result(out) for _, out, _ in two]
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 2 for r in results)
    assert results[0]["losses"] == pytest.approx(one, rel=1e-5)
    assert results[1]["losses"] == results[0]["losses"]  # every process sees the global loss


def test_train_command_as_two_processes(tmp_path):
    workdir = str(tmp_path / "run")
    coord = f"127.0.0.1:{_free_port()}"
    cmds = [
        [sys.executable, "-m", "mixers_jax.train", f"--config={config_path('mixer_clm', 'smoke')}",
         f"--workdir={workdir}", f"--coordinator_address={coord}", "--num_processes=2",
         f"--process_id={i}"]
        for i in range(2)
    ]
    ((rc0, out0, err0), (rc1, out1, err1)), _ = _run_all(cmds, devices=1)
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 0, err1[-3000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in out0, out0
    assert "step      6/6" in out0 and "done: 6 steps" in out0
    assert "step " not in out1  # only process 0 reports progress and writes the log
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        assert json.load(f)["final_step"] == 6


def test_incomplete_coordinator_flags_are_refused(tmp_path, capsys, monkeypatch):
    """In this process (the command's own entry point runs in the test above); nothing written."""
    from mixers_jax import train

    workdir = tmp_path / "run"
    argv = ["train", f"--config={config_path('mixer_clm', 'smoke')}", f"--workdir={workdir}",
            "--coordinator_address=127.0.0.1:1"]
    monkeypatch.setattr(sys, "argv", argv)  # where ml_collections finds --config.* overrides
    assert exit_status(train, argv) != 0
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: --coordinator_address"), err
    assert not workdir.exists()
