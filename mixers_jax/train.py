"""Command line: ``python -m mixers_jax.train --config=configs/NAME.py[:preset] [--workdir=DIR]``.

Config values are overridden with ``--config.section.key=value``; an unknown key or preset stops
with a one-line message. Without ``--workdir`` the run goes to ``workdirs/<config name>``.

Exit status: 0 finished; 1 failure: an OSError in one line, or training diverged (a NaN or an
infinity in the loss, gradient norm, parameters or evaluation; the line names the step and the last
good checkpoint, results.json records it), unless train.on_divergence=record makes the divergence
step the run's result (status 0, "done: diverged at step N ..."); 2 bad flag, config, data or workdir (also: the workdir
is in use by another run); 75 preempted (SIGTERM or Ctrl-C saved a checkpoint: rerun the same
command to resume); 130 interrupted before training started.
"""
from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from mixers_jax import cli
from mixers_jax.errors import Preempted, UserError

FLAGS = cli.flag_values()
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':preset'.", lock_config=True,
    flag_values=FLAGS,
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, logs, tokenizer); default workdirs/<config name>.",
    flag_values=FLAGS,
)

_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Multi-host: 'on' calls jax.distributed.initialize (TPU pods, SLURM and Open MPI need no other "
    "flag); 'auto' does so when a coordinator flag is given or SLURM/TPU-pod/MPI variables show "
    "several processes; 'off' never.", flag_values=FLAGS,
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (GPU clusters without SLURM).",
    flag_values=FLAGS,
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.",
                                      flag_values=FLAGS)
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0..num_processes-1.",
                                   flag_values=FLAGS)


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


def main(argv: list[str]) -> None:
    del argv  # positional arguments are refused by cli.run
    logging.set_verbosity(logging.WARNING)  # orbax reports every file it writes at INFO
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("workdirs", config.name)
    from mixers_jax import trainer  # imported after flags so --help stays fast

    _maybe_initialize_distributed()
    if config.model.kind == "matcher":  # batches of frozen embeddings (docs/search.md)
        from mixers_jax import matching

        summary = trainer.run(config, workdir, build_data=matching.build_data)
    else:
        summary = trainer.run(config, workdir)
    if summary.get("diverged", {}).get("recorded"):
        # train.on_divergence=record: the divergence step is this run's result, not a failure.
        if summary.get("is_main", True):
            d = summary["diverged"]
            print(f"done: diverged at step {d['step']} ({d['what']}; train.on_divergence=record); "
                  f"last good checkpoint: step {d['last_good_step']}; workdir {summary['workdir']}")
        return
    if summary.get("diverged"):
        # Exit 1, not 2: the input was valid and the run trained (and wrote checkpoints); its
        # numbers failed. The line names the last good checkpoint to resume or inspect from.
        if summary.get("is_main", True):
            cli.error(summary["diverged"]["message"])
        return cli.EXIT_FAILURE
    if summary.get("preempted"):
        raise Preempted(f"saved step {summary['final_step']} in {workdir}; rerun the same command "
                        "to resume")
    if not summary.get("is_main", True):
        return
    ev = summary["eval"]
    if config.model.kind == "matcher":  # no text is predicted: CE and top-1 over the pool
        print(f"done: {summary['final_step']} steps; held-out CE {ev['loss']:.4f}, top-1 "
              f"{ev['accuracy']:.4f} over {config.model.n_ctx - 1} candidates; workdir "
              f"{summary['workdir']}")
        return
    print(
        f"done: {summary['final_step']} steps; eval loss {ev['loss']:.4f}, "
        f"accuracy {ev['accuracy']:.4f}, bits/byte {ev['bpb']:.4f}; workdir {summary['workdir']}"
    )


def run_command(argv: list[str] | None = None) -> None:
    """``python -m mixers_jax.train``: exit status as in mixers_jax/cli.py (75: preempted, resume
    by rerunning)."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, required=("config",), config=_CONFIG)


if __name__ == "__main__":
    run_command()
