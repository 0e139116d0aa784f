"""Helpers shared by the tests."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def config_path(name: str, preset: str | None = None) -> str:
    path = os.path.join(CONFIGS, f"{name}.py")
    return f"{path}:{preset}" if preset else path


def exit_status(command, argv: list[str]) -> int:
    """The exit status of ``command.run_command(argv)`` run in this process (it always exits)."""
    try:
        command.run_command(list(argv))
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    raise AssertionError(f"{command.__name__}.run_command returned without exiting")


def snapshot(path: str) -> dict | None:
    """{relative file path: (size, mtime_ns)} of every file under ``path``; None if it is absent."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------- damaging a checkpoint


def largest_array_file(step_dir, item="params"):
    files = []
    for dirpath, _, names in os.walk(os.path.join(step_dir, item)):
        files += [os.path.join(dirpath, n) for n in names if os.sep + "d" + os.sep in os.path.join(dirpath, n)]
    return max(files, key=os.path.getsize)


def truncate(step_dir):
    path = largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def flip_byte(step_dir):
    path = largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x10]))


CORRUPTIONS = {
    "truncated array file": (truncate, "bytes, expected"),
    "params metadata deleted": (lambda d: os.remove(os.path.join(d, "params", "_METADATA")),
                                "params/_METADATA: missing"),
    "data metadata deleted": (lambda d: os.remove(os.path.join(d, "data", "metadata")),
                              "data/metadata: missing"),
    "flipped byte": (flip_byte, "hash mismatch"),
}


def xla_flags_with_devices(devices: int | None) -> str:
    """This process's XLA_FLAGS (conftest.py's settings) for a subprocess with ``devices`` fake CPU
    devices (None: the platform's own one)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return " ".join(flags.split())
