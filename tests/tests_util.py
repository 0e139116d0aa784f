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


def xla_flags_with_devices(devices: int | None) -> str:
    """This process's XLA_FLAGS (conftest.py's settings) for a subprocess with ``devices`` fake CPU
    devices (None: the platform's own one)."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    if devices is not None:
        flags += f" --xla_force_host_platform_device_count={devices}"
    return " ".join(flags.split())
