"""Profiling and ahead-of-time checks of the train step (mixers_jax/profiling.py does the work).

    python -m mixers_jax.profile --config=configs/NAME.py[:preset] --what=WHAT[,WHAT...] --out=DIR
        [--mesh=DATAxFSDPxTENSOR] [--steps=5] [--config.key=value ...]

WHAT:
  jaxpr   the jaxpr of the train step and of the forward pass -> DIR/{train_step,forward}.jaxpr.txt
  hlo     their optimized (compiled) HLO -> DIR/{train_step,forward}.hlo.txt
  cost    FLOPs per primitive counted from the jaxpr (every dot_general and conv with its shapes),
          beside the analytic count (flops.py) and XLA's cost analysis
  memory  the compiled step's memory analysis per device (arguments, outputs, temporaries)
  trace   a jax.profiler trace of --steps real steps (random tokens) -> DIR/trace (TensorBoard's
          profile tab), the step time, MFU, and the device time split by op kind
  aot     lower and compile the train step for --mesh on that many *fake CPU devices* and report
          per-device parameter, optimizer and activation memory without allocating anything, and
          the SPMD partitioner's "involuntary full rematerialization" warnings (each one an array
          replicated on every device and cut again: hidden communication at every step)
  all     jaxpr,hlo,cost,memory

With ``aot`` in WHAT the process sets ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and
``JAX_PLATFORMS=cpu`` before JAX loads, and turns the persistent compilation cache off (so that the
step is really compiled and its warnings can be counted); everything else in the same call then
runs on those fake devices too. Without it, ``--mesh`` (default: the config's mesh and sharding preset) uses the real
devices. The report is written to DIR/profile.json.

Exit status: 0 done; 1 an OSError (e.g. DIR not writable), one line; 2 bad flags, config, --what or
--mesh, one line; 130 interrupted.
"""
from __future__ import annotations

import os
import re
import sys

from absl import flags, logging
from ml_collections import config_flags

from mixers_jax import cli
from mixers_jax.errors import UserError

FLAGS = cli.flag_values()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':preset'.", lock_config=True,
    flag_values=FLAGS,
)
_WHAT = flags.DEFINE_string("what", "all", "Comma-separated: jaxpr, hlo, cost, memory, trace, aot, all.",
                            flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output directory.", flag_values=FLAGS)
_MESH = flags.DEFINE_string("mesh", None, "DATAxFSDPxTENSOR, e.g. 2x2x2 (default: the config's).",
                            flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 5, "Steps to trace with --what=trace (after 2 warm-up steps).",
                              lower_bound=1, flag_values=FLAGS)


def _argv_value(argv, name):
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _fake_devices_for_aot(argv) -> None:
    """Before JAX loads: N fake CPU devices when --what has 'aot' (N from --mesh)."""
    what, mesh = _argv_value(argv, "what") or "", _argv_value(argv, "mesh")
    if "aot" not in what.split(",") or not mesh:
        return
    try:
        n = 1
        for part in mesh.lower().split("x"):
            n *= int(part)
    except ValueError:
        return  # reported properly once flags are parsed
    flags_env = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={n}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    # A persistent-cache hit compiles nothing, so XLA would log no partitioner warnings to count.
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    logging.set_verbosity(logging.WARNING)
    from mixers_jax import profiling, sharding  # jax: after the fake-device setup; fast --help

    what = profiling.parse_what(_WHAT.value)
    if _MESH.value:
        sharding.parse_mesh(_MESH.value)
    if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
        raise UserError(f"--out={_OUT.value} is a file; give a folder")
    profiling.profile(_CONFIG.value, what, _OUT.value, _MESH.value, _STEPS.value)


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.profile``; exit status as in mixers_jax/cli.py."""
    argv = list(sys.argv if argv is None else argv)
    _fake_devices_for_aot(argv)
    cli.run(main, FLAGS, doc=__doc__, argv=argv, required=("config", "out"), config=_CONFIG)


if __name__ == "__main__":
    run_command()
