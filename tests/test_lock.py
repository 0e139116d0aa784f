"""WorkdirLock: one run per workdir, between real processes; dead holders are taken over."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from mixers_jax import lock
from mixers_jax.errors import UserError

_HOLD = textwrap.dedent("""
    import sys, time
    from mixers_jax.errors import UserError
    from mixers_jax.lock import WorkdirLock
    try:
        with WorkdirLock(sys.argv[1]):
            print("locked", flush=True)
            time.sleep(float(sys.argv[2]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
""")


def _start(workdir, seconds):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", _HOLD, str(workdir), str(seconds)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_second_process_fails_in_one_line_and_a_killed_holder_is_taken_over(tmp_path):
    workdir = tmp_path / "run"
    first = _start(workdir, 120)
    try:
        assert first.stdout.readline() == "locked\n"
        holder = lock.live_run(str(workdir))
        assert holder is not None and holder.pid == first.pid and holder.host == socket.gethostname()

        second = _start(workdir, 0)
        out, err = second.communicate(timeout=60)
        assert second.returncode == 1 and out == ""
        assert err == (f"error: workdir {workdir} is in use by pid {first.pid} on "
                       f"{socket.gethostname()} since {holder.since}\n")
        with pytest.raises(UserError, match=f"in use by pid {first.pid}"):
            lock.WorkdirLock(str(workdir)).acquire()  # also within one process
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert lock.live_run(str(workdir)) is None  # the kernel dropped the dead holder's lock
    stale = json.loads((workdir / lock.LOCK_FILE).read_text())
    assert stale["pid"] == first.pid

    third = _start(workdir, 0)
    out, err = third.communicate(timeout=60)
    assert third.returncode == 0 and out == "locked\n"
    assert err.splitlines() == [
        f"taking over {workdir / lock.LOCK_FILE}: its holder, pid {first.pid} on "
        f"{socket.gethostname()} since {stale['since']}, is no longer running"]
    assert not (workdir / lock.LOCK_FILE).exists()  # released cleanly


def test_lock_in_process_and_read_only_probe(tmp_path):
    messages = []
    assert lock.live_run(str(tmp_path / "none")) is None
    assert not (tmp_path / "none").exists()  # the probe creates nothing
    with lock.WorkdirLock(str(tmp_path / "new")):
        assert (tmp_path / "new" / lock.LOCK_FILE).exists()
    assert not (tmp_path / "new").exists()  # a run that wrote nothing leaves no empty workdir
    with lock.WorkdirLock(str(tmp_path / "new")):
        (tmp_path / "new" / "log.txt").write_text("x")
    assert os.listdir(tmp_path / "new") == ["log.txt"]
    with lock.WorkdirLock(str(tmp_path), log=messages.append) as held:
        info = json.loads((tmp_path / lock.LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and held.path == str(tmp_path / lock.LOCK_FILE)
        assert lock.live_run(str(tmp_path)).pid == os.getpid()
        with pytest.raises(UserError, match=f"workdir {tmp_path} is in use by pid {os.getpid()}"):
            with lock.WorkdirLock(str(tmp_path)):
                pass
    assert messages == [] and lock.live_run(str(tmp_path)) is None
    assert os.listdir(tmp_path) == ["new"]
    with lock.WorkdirLock(str(tmp_path)):  # free again
        pass
