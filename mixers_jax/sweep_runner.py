"""Runs the experiments of :mod:`mixers_jax.experiments` into a results folder (the library of
``python -m mixers_jax.sweep``).

Each experiment runs as subprocesses into ``<out>/<name>/``: ``python -m mixers_jax.train
--config=... --workdir=<out>/<name> [overrides]``, then its follow-up commands. It is resumable
and never deletes anything:

* a run whose ``results.json`` and follow-up outputs exist is **skipped**;
* a run killed half-way is resumed by the same command (the trainer's exact resume from its newest
  checkpoint); a follow-up whose output exists is not rerun;
* an experiment whose ``needs`` are not finished is **blocked** (named, not run); the rows that need
  ``--text`` are not run without it;
* a failing command (exit status not 0) marks the experiment failed and the sweep goes on with the
  rest; Ctrl-C (which reaches the running command too) or SIGTERM (passed on to it) lets the
  running command save its checkpoint, then stops the sweep (rerun to resume).

Every command's output goes to ``<name>/sweep.log``; ``<name>/sweep.json`` records the commands,
their exit statuses and wall times (summed over resumes) and, for an equal-wall-time run, the steps
chosen and the step times they came from. A progress line per experiment:
``[k/N] name: running | skipped (finished) | done in 9 min 3 s | failed (exit 1) ...``.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from mixers_jax.errors import Preempted, UserError
from mixers_jax.experiments import BY_NAME, Experiment, equal_time_overrides, equal_time_steps
from mixers_jax.fileio import write_atomic
from mixers_jax.metrics import format_duration

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_FILE = "results.json"  # written by the trainer when a run has finished
SWEEP_FILE = "sweep.json"
LOG_FILE = "sweep.log"
MACHINE_FILE = "machine.json"
STEP_TIME = "perf/step_s"


def read_json(path: str) -> dict | None:
    """The JSON object in ``path``; None when it is absent or unreadable (a run being written)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _fill(text: str, out: str, run: str, text_file: str) -> str:
    return text.replace("{out}", out).replace("{run}", run).replace("{text}", text_file)


def train_argv(exp: Experiment, out: str, text_file: str = "", extra: Sequence[str] = (),
               module: str = "mixers_jax.train") -> list[str]:
    """The training command of ``exp`` (config paths relative to the repository)."""
    run = os.path.join(out, exp.name)
    config = exp.config if os.path.isabs(exp.config) else os.path.join(REPO, exp.config)
    return [sys.executable, "-m", module, f"--config={config}", f"--workdir={run}",
            *(_fill(o, out, run, text_file) for o in exp.overrides), *extra]


def after_argv(exp: Experiment, out: str, text_file: str = "") -> list[tuple[str, list[str]]]:
    """(output path, command) of each follow-up of ``exp``."""
    run = os.path.join(out, exp.name)
    return [(os.path.join(run, output), [sys.executable, "-m", *(_fill(a, out, run, text_file) for a in argv)])
            for output, argv in exp.after]


def status(exp: Experiment, out: str) -> str:
    """'finished' (results.json and every follow-up output), 'trained' (results.json only),
    'failed' (the last attempt exited non-zero), 'started' (a folder without results), or 'absent'."""
    run = os.path.join(out, exp.name)
    failed = (read_json(os.path.join(run, SWEEP_FILE)) or {}).get("status") == "failed"
    if os.path.exists(os.path.join(run, RESULTS_FILE)):
        if all(os.path.exists(os.path.join(run, o)) for o, _ in exp.after):
            return "finished"
        return "failed" if failed else "trained"
    if not os.path.isdir(run):
        return "absent"
    return "failed" if failed else "started"


TIMING_FILE = "step_times.json"


def timing_argv(exp: Experiment, out: str, bench_module: str = "mixers_jax.bench") -> list[str]:
    """``bench --suite=runs`` timing the train steps of ``exp``'s reference run and of its own
    equal-steps run in turn, into ``<out>/<exp>/step_times.json``."""
    ref, own = (os.path.join(out, n) for n in (exp.equal_time, exp.measure))
    return [sys.executable, "-m", bench_module, "--suite=runs", f"--workdirs={ref},{own}", "--steps=5",
            f"--out={os.path.join(out, exp.name, TIMING_FILE)}"]


def equal_time_plan(exp: Experiment, out: str) -> dict:
    """{steps, overrides, ref_step_s, step_s, ref_steps} of an equal-wall-time run, from the step
    times of its reference and of its own equal-steps run that ``bench --suite=runs`` measured in
    turn (A, B, A, B, ...; :func:`timing_argv`), so that the machine's load at the time each run
    trained does not enter the ratio; UserError when the runs or the timings are missing."""
    ref_dir, own_dir = os.path.join(out, exp.equal_time), os.path.join(out, exp.measure)
    ref_config, own_config = (read_json(os.path.join(d, "config.json")) for d in (ref_dir, own_dir))
    timing_path = os.path.join(out, exp.name, TIMING_FILE)
    step_s = {r.get("case"): r.get("step_s") for r in (read_json(timing_path) or {}).get("records", [])}
    ref_s, own_s = step_s.get(ref_dir), step_s.get(own_dir)
    if not (ref_config and own_config and ref_s and own_s):
        raise UserError(f"{exp.name}: no step times of {ref_dir} and {own_dir} in {timing_path}")
    ref_steps = int(ref_config["train"]["steps"])
    steps = equal_time_steps(ref_steps, ref_s, own_s)
    return {"reference": exp.equal_time, "measure": exp.measure, "ref_steps": ref_steps,
            "ref_step_s": ref_s, "step_s": own_s, "steps": steps, "timing": TIMING_FILE,
            "overrides": list(equal_time_overrides(steps, own_config["train"]))}


class Sweep:
    """One pass over ``experiments`` into ``out``; ``print_fn`` gets the progress lines.
    ``train_module`` / ``bench_module`` are the training and benchmark commands' modules (tests
    give stand-ins)."""

    def __init__(self, experiments: Sequence[Experiment], out: str, *, text_file: str = "",
                 print_fn: Callable[[str], None] = print, env: dict | None = None,
                 train_module: str = "mixers_jax.train", bench_module: str = "mixers_jax.bench"):
        self.experiments, self.out = list(experiments), os.path.abspath(out)
        self.bench_module = bench_module
        self.by_name = {**BY_NAME, **{e.name: e for e in self.experiments}}
        self.train_module = train_module
        self.text_file = os.path.abspath(text_file) if text_file else ""
        self.print, self.failed = print_fn, []
        self.env = dict(os.environ if env is None else env)
        path = self.env.get("PYTHONPATH", "")
        self.env["PYTHONPATH"] = REPO + (os.pathsep + path if path else "")

    def train_argv(self, exp: Experiment, extra: Sequence[str] = ()) -> list[str]:
        return train_argv(exp, self.out, self.text_file, extra, self.train_module)

    def line(self, k: int, exp: Experiment, what: str) -> None:
        self.print(f"[{k}/{len(self.experiments)}] {exp.name}: {what}")

    def blocked_by(self, exp: Experiment) -> list[str]:
        return [n for n in exp.needs if status(self.by_name[n], self.out) not in ("finished", "trained")]

    def dry_run(self) -> None:
        for k, exp in enumerate(self.experiments, 1):
            state = status(exp, self.out)
            if state == "finished":
                self.line(k, exp, "skipped (finished)")
                continue
            if exp.needs_text and not self.text_file:
                self.line(k, exp, "not run: needs --text=FILE")
                continue
            extra = [f"<steps from the step times of {exp.equal_time} and {exp.measure}>"] if exp.equal_time else []
            self.line(k, exp, f"would run ({state})")
            if state != "trained":
                self.print("    " + " ".join(self.train_argv(exp, extra)))
            for _, argv in after_argv(exp, self.out, self.text_file):
                self.print("    " + " ".join(argv))

    def run(self) -> list[str]:
        """Runs every experiment not finished; returns the names that failed or were blocked."""
        for k, exp in enumerate(self.experiments, 1):
            if status(exp, self.out) == "finished":
                self.line(k, exp, "skipped (finished)")
                continue
            if exp.needs_text and not self.text_file:
                self.line(k, exp, "not run: needs --text=FILE")
                continue
            blocked = self.blocked_by(exp)
            if blocked:
                self.line(k, exp, f"blocked: needs {', '.join(blocked)} (not finished)")
                self.failed.append(exp.name)
                continue
            try:
                plan = self.plan(exp)
            except UserError as e:
                self.line(k, exp, f"failed: {e}")
                self.failed.append(exp.name)
                continue
            self.line(k, exp, "running")
            ok, wall = self.run_one(exp, plan)
            if ok:
                self.line(k, exp, f"done in {format_duration(wall)}")
            else:
                log = os.path.join(self.out, exp.name, LOG_FILE)
                self.line(k, exp, f"failed after {format_duration(wall)}; see {log}")
                self.failed.append(exp.name)
        return self.failed

    def plan(self, exp: Experiment) -> dict | None:
        """The equal-wall-time plan of ``exp``: the one recorded in its sweep.json (a resumed run
        keeps its steps), else computed now from step times measured now (kept in its
        step_times.json); None for other runs. UserError without step times."""
        if not exp.equal_time:
            return None
        run = os.path.join(self.out, exp.name)
        recorded = read_json(os.path.join(run, SWEEP_FILE)) or {}
        if recorded.get("equal_time"):
            return recorded["equal_time"]
        if not os.path.exists(os.path.join(run, TIMING_FILE)):
            os.makedirs(run, exist_ok=True)
            code, _ = self.call(timing_argv(exp, self.out, self.bench_module), os.path.join(run, LOG_FILE))
            if code in (75, 130):
                raise Preempted(f"interrupted while timing the steps for {exp.name}")
        return equal_time_plan(exp, self.out)

    def run_one(self, exp: Experiment, plan: dict | None = None) -> tuple[bool, float]:
        run = os.path.join(self.out, exp.name)
        os.makedirs(run, exist_ok=True)
        record_path = os.path.join(run, SWEEP_FILE)
        record = read_json(record_path) or {"name": exp.name, "config": exp.config, "commands": [],
                                            "wall_s": 0.0}
        record["status"] = "running"
        extra: list[str] = []
        if plan:
            record["equal_time"] = plan
            extra = list(plan["overrides"])
        todo = []
        if not os.path.exists(os.path.join(run, RESULTS_FILE)):
            todo.append((os.path.join(run, RESULTS_FILE), self.train_argv(exp, extra)))
        todo += [(o, argv) for o, argv in after_argv(exp, self.out, self.text_file) if not os.path.exists(o)]
        spent = 0.0
        for output, argv in todo:
            code, wall = self.call(argv, os.path.join(run, LOG_FILE))
            spent += wall
            record["commands"].append({"argv": argv, "exit": code, "wall_s": round(wall, 3),
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
            record["wall_s"] = round(float(record["wall_s"]) + wall, 3)
            if code in (75, 130):  # the command saved and stopped on request
                record["status"] = "interrupted"
                write_atomic(record_path, json.dumps(record, indent=2))
                raise Preempted(f"interrupted during {exp.name}; rerun the same command to resume")
            if code != 0 or not os.path.exists(output):
                record["status"] = "failed"
                write_atomic(record_path, json.dumps(record, indent=2))
                return False, spent
            write_atomic(record_path, json.dumps(record, indent=2))
        record["status"] = "done"
        write_atomic(record_path, json.dumps(record, indent=2))
        return True, spent

    def call(self, argv: list[str], log_path: str) -> tuple[int, float]:
        """Runs ``argv`` (output appended to ``log_path``); (exit status, wall seconds). Ctrl-C
        reaches the child too (same process group); the child's own status is returned."""
        t0 = time.time()
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
            with _forward_sigterm(proc):
                while True:
                    try:
                        code = proc.wait()
                        break
                    except KeyboardInterrupt:
                        continue  # the child got the same SIGINT: wait for it to save and exit
        return code, time.time() - t0


@contextlib.contextmanager
def _forward_sigterm(proc: subprocess.Popen):
    """While ``proc`` runs, SIGTERM to this process is passed on to it (it saves and exits 75,
    which stops the sweep); outside the main thread signals cannot be caught and nothing changes."""
    try:
        previous = signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def measure_machine(out: str, env: dict | None = None) -> dict:
    """The machine the sweep runs on (cores, CPU model, XLA's 1024x1024 fp32 matmul rate, library
    versions), measured in a subprocess once and kept in ``<out>/machine.json``."""
    path = os.path.join(out, MACHINE_FILE)
    known = read_json(path)
    if known:
        return known
    code = ("import json; from mixers_jax.benchmarks import matmul_rate; "
            "from mixers_jax.environment import environment; "
            "e = environment(); e['matmul_gflops'] = matmul_rate() / 1e9; print(json.dumps(e))")
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    machine = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {}
    machine["cpu_model"] = _cpu_model()
    machine.setdefault("cpu_count", os.cpu_count())
    os.makedirs(out, exist_ok=True)
    write_atomic(path, json.dumps(machine, indent=2))
    return machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"

