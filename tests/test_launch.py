"""Launch scripts: every --dry-run prints well-formed commands and runs nothing."""
import os
import shlex
import subprocess

import pytest

from tests_util import REPO

LAUNCH = os.path.join(REPO, "launch")
TRAIN = ["--config=configs/mixer_clm.py:fineweb", "--workdir=/shared/run one"]


def _dry(script, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = "/usr/bin:/bin"  # no gcloud, srun or scontrol: a dry run must not need them
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


def _train_part(cmd):
    i = cmd.index("mixers_jax.train")
    assert cmd[i - 1] == "-m"
    return cmd[i + 1:]


def test_gpu_dry_run():
    cmds = _dry("gpu.sh", "--dry-run", "--gpus=0,1", "--", *TRAIN)
    assert cmds[0] == ["cd", REPO]
    train = cmds[-1]
    assert train[:3] == ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "CUDA_VISIBLE_DEVICES=0,1"]
    assert _train_part(train) == TRAIN  # the workdir with a space survives quoting


def test_slurm_dry_run():
    (cmd,) = _dry("slurm.sbatch", "--dry-run", "--nodes=4", "--port=9999", "--", *TRAIN)
    assert cmd[0] == "srun" and "--nodes=4" in cmd and "--ntasks-per-node=1" in cmd
    train = _train_part(cmd)
    assert "--distributed=on" in train and "--num_processes=4" in train
    coord = next(a for a in train if a.startswith("--coordinator_address="))
    assert coord.endswith(":9999") and "scontrol show hostnames" in coord
    assert train[-1] == "--process_id=$SLURM_PROCID"
    assert all(a in train for a in TRAIN)


def test_tpu_pod_dry_run():
    cmds = _dry("tpu_pod.sh", "--dry-run", "--name=pod", "--zone=us-central2-b", "--type=v4-32",
                "--repo=https://example.org/mixers.git@v1", "--", *TRAIN)
    verbs = [c[:5] for c in cmds if c[0] == "gcloud"]
    assert verbs[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert "--accelerator-type=v4-32" in cmds[0]
    ssh = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 3 and all("--worker=all" in c for c in ssh)
    remote = [next(a for a in c if a.startswith("--command="))[len("--command="):] for c in ssh]
    assert "git clone https://example.org/mixers.git" in remote[0] and "checkout v1" in remote[0]
    assert "pip install" in remote[1]
    train = shlex.split(remote[2].split("&&", 1)[1].split("2>&1")[0])
    assert train[:4] == ["python", "-m", "mixers_jax.train", "--distributed=on"]
    assert train[4:] == TRAIN
    assert cmds[-1][:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=0" in cmds[-1]


def test_tpu_pod_copies_the_checkout_without_repo():
    cmds = _dry("tpu_pod.sh", "--dry-run", "--name=pod", "--zone=z", "--type=v5p-16", "--", *TRAIN)
    scp = cmds[1]
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"] and REPO in scp


@pytest.mark.parametrize(
    "script,args",
    [("gpu.sh", ["--dry-run"]), ("slurm.sbatch", ["--dry-run"]),
     ("tpu_pod.sh", ["--dry-run", "--zone=z", "--type=v4-8", "--", *TRAIN])],
)
def test_missing_arguments_exit_2_with_one_line(script, args):
    proc = subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("status,requeued", [(75, True), (0, False), (2, False)])
def test_slurm_requeues_a_preempted_run(tmp_path, status, requeued):
    """Exit status 75 (preempted, checkpoint saved) puts the job back in the queue; others end it.
    ``srun`` and ``scontrol`` are stand-ins that record their calls."""
    calls = tmp_path / "calls"
    for name, body in (("srun", f"echo srun >> {calls}; exit {status}"),
                       ("scontrol", f'echo "scontrol $*" >> {calls}')):
        stub = tmp_path / name
        stub.write_text(f"#!/bin/sh\n{body}\n")
        stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{tmp_path}:/usr/bin:/bin", SLURM_JOB_ID="123", SLURM_JOB_NUM_NODES="1")
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), *TRAIN], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == status
    lines = calls.read_text().splitlines()
    assert lines[0] == "srun"
    assert ("scontrol requeue 123" in lines) == requeued
