"""Command line: ``python -m mixers_jax.train --config=configs/NAME.py[:preset] [--workdir=DIR]``.

Config values are overridden with ``--config.section.key=value``; an unknown key or preset stops
with a one-line message. Without ``--workdir`` the run goes to ``workdirs/<config name>``.
"""
from __future__ import annotations

import ast
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mixers_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':preset'.", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, logs, tokenizer); default workdirs/<config name>."
)

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-host: 'on' calls jax.distributed.initialize (TPU pods, SLURM and Open MPI need no other "
    "flag); 'auto' does so when a coordinator flag is given or SLURM/TPU-pod/MPI variables show "
    "several processes; 'off' never.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (GPU clusters without SLURM)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.")


def _maybe_initialize_distributed() -> None:
    """jax.distributed.initialize before anything touches devices (see --distributed)."""
    from mixers_jax import sharding

    explicit = _COORDINATOR.value or _NUM_PROCESSES.value is not None or _PROCESS_ID.value is not None
    mode = _DISTRIBUTED.value
    if mode == "off" or (mode == "auto" and not explicit and sharding.detect_multiprocess() is None):
        return
    if explicit and not (_COORDINATOR.value and _NUM_PROCESSES.value and _PROCESS_ID.value is not None):
        raise UserError("--coordinator_address, --num_processes and --process_id go together")
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def _one_line(e: BaseException) -> str:
    """The gist of an absl / ml_collections parsing error, in one line."""
    text = str(e.args[0]) if e.args else str(e)
    wrapped_key = isinstance(e, KeyError) or text[:1] in "'\""
    for _ in range(3):  # ml_collections wraps KeyError reprs in quotes, sometimes twice
        if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
            try:
                text = str(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                break
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if any("No such file" in ln for ln in lines):
        missing = next(ln for ln in lines if "No such file" in ln)
        return "config file not found: " + missing.rsplit(":", 1)[-1].strip().strip("'")
    if wrapped_key or any(ln.startswith("Did you mean") for ln in lines):
        key = lines[0].strip("'\"") if lines else "?"
        hint = next((f" ({ln[0].lower()}{ln[1:]})" for ln in lines if ln.startswith("Did you mean")), "")
        return f"unknown config key {key!r}{hint}"
    last = lines[-1] if lines else type(e).__name__
    return last.split(": ", 1)[1] if last.startswith(("ValueError: ", "KeyError: ")) else last


def _parse(argv: list[str]) -> list[str]:
    """absl flag parsing that reports a bad flag, config key or preset in one line, exit 2."""
    try:
        rest = flags.FLAGS(argv)
        if _CONFIG.value is not None:
            _ = _CONFIG.value.name  # config files load lazily; surface their errors here
        return rest
    except Exception as e:  # noqa: BLE001 - every parsing problem becomes one line
        print(f"error: {_one_line(e)}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO
    config = _CONFIG.value
    if config is None:
        print("error: --config=configs/NAME.py[:preset] is required", file=sys.stderr)
        raise SystemExit(2)
    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    from mixers_jax import trainer  # imported after flags so --help stays fast

    try:
        _maybe_initialize_distributed()
        summary = trainer.run(config, workdir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if summary.get("preempted") or not summary.get("is_main", True):
        return
    ev = summary["eval"]
    print(
        f"done: {summary['final_step']} steps; eval loss {ev['loss']:.4f}, "
        f"accuracy {ev['accuracy']:.4f}, bits/byte {ev['bpb']:.4f}; workdir {summary['workdir']}"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=_parse)
