"""The training loop: mesh, state, data, checkpoints, logging (``run``).

``run(config, workdir)`` trains one model. It holds the workdir's lock (:mod:`mixers_jax.lock`)
for its whole life, validates everything that can be wrong with the input *before* it writes into
the workdir, and resumes automatically from the workdir's newest intact checkpoint (a damaged newer
one is set aside with a message). A resume must use the same model, data settings, seed and
tokenizer as the checkpoint; other settings (train.*) may change and are recorded in the workdir's
history. The run stops on a non-finite loss, gradient norm, post-update state or evaluation
without saving the broken state, and records the divergence (the summary, results.json, the log);
SIGTERM and Ctrl-C become "save, then exit cleanly". The compiled steps are
:mod:`mixers_jax.steps`, the stages of a curriculum :mod:`mixers_jax.curriculum`, the workdir
format :mod:`mixers_jax.workdir`.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax import flops as flops_lib
from mixers_jax import metrics as metrics_lib
from mixers_jax import ranking
from mixers_jax import recovery as recovery_lib
from mixers_jax import sharding, target_bytes
from mixers_jax import workdir as workdir_lib
from mixers_jax.curriculum import (Stage, check_stage, csv_names, eval_objective_names, init_map,
                                   merge_init_params, stage_at, stage_config, stages)
from mixers_jax.data import pairs as pairs_lib
from mixers_jax.data import pipeline
from mixers_jax.models.embedding import embedding_position
from mixers_jax.objectives import PAIR_OBJECTIVES
from mixers_jax.errors import UserError
from mixers_jax.config import input_length
from mixers_jax.lock import WorkdirLock
from mixers_jax.models.layers import REMAT_POLICIES
from mixers_jax.models.specs import DTYPES
from mixers_jax.steps import MAX_CONSECUTIVE_SKIPS, Steps, TrainState, build_steps, evaluate_all

ON_DIVERGENCE = ("fail", "record")  # train.on_divergence


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the config fields the trainer relies on; raises UserError naming the problem."""
    t = config.train
    if t.steps <= 0:
        raise UserError(f"train.steps must be positive, got {t.steps}")
    if t.batch_size <= 0:
        raise UserError(f"train.batch_size must be positive, got {t.batch_size}")
    if t.grad_accum <= 0 or t.batch_size % t.grad_accum:
        raise UserError(
            f"train.batch_size={t.batch_size} must divide by train.grad_accum={t.grad_accum}"
        )
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if t[key] <= 0:
            raise UserError(f"train.{key} must be positive, got {t[key]}")
    if not t.lr > 0:
        raise UserError(f"train.lr must be positive, got {t.lr}")
    if t.warmup_steps < 0:
        raise UserError(f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    ckpt_lib.check_keep(t.keep_checkpoints)
    if t.on_divergence not in ON_DIVERGENCE:
        raise UserError(f"train.on_divergence must be one of {ON_DIVERGENCE}, got {t.on_divergence!r}")
    if t.get("remat", "none") not in REMAT_POLICIES:
        raise UserError(f"train.remat must be one of {REMAT_POLICIES}, got {t.remat!r}")
    if t.schedule not in ("linear", "cosine"):
        raise UserError(f"train.schedule must be 'linear' or 'cosine', got {t.schedule!r}")
    if config.data.packing not in ("concat", "pad"):
        raise UserError(f"data.packing must be 'concat' or 'pad', got {config.data.packing!r}")
    if not pair_data(config):
        pipeline.check_padding(str(config.data.padding), str(config.data.packing))
    if config.model.dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {DTYPES}, got {config.model.dtype!r}")
    profile_window(config)
    sharding.resolve(config)


def pair_data(config) -> bool:
    """True when the run trains on (query, passage) pairs (every stage's objective and evaluation
    objective is a pair objective such as 'infonce'); UserError when pair and text objectives mix."""
    names = set()
    for st in stages(config):
        names.update((str(st.train.objective), *eval_objective_names(st.train)))
    paired = {n in PAIR_OBJECTIVES for n in names}
    if len(paired) > 1:
        raise UserError(f"objectives {', '.join(sorted(names))} mix pair objectives "
                        f"({', '.join(PAIR_OBJECTIVES)}) with text objectives; one run reads one kind "
                        "of data (use init_from between two runs)")
    return paired == {True}


def profile_window(config) -> tuple[int, int] | None:
    """``train.profile_steps='a:b'`` -> (a, b): trace the steps a, ..., b-1 (0-based); '' -> None."""
    text = str(config.train.get("profile_steps", "") or "").strip()
    if not text:
        return None
    a, sep, b = text.partition(":")
    try:
        start, stop = int(a), int(b)
    except ValueError:
        start, stop = -1, -1
    if not sep or start < 0 or stop <= start:
        raise UserError(f"train.profile_steps must look like 'a:b' with 0 <= a < b, got {text!r}")
    return start, stop


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    stop_at_step: int | None = None,
    record_batches: bool = False,
    build_data=None,
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint); returns a summary.

    ``stop_at_step`` behaves like a preemption at that step (save, then return), for tests and
    for splitting a run; ``record_batches`` adds a digest of every consumed batch to the summary.
    A curriculum (``train.stages``) runs every stage in turn; the checkpoint's step says which
    stage it belongs to, so a run killed mid-stage resumes mid-stage. ``build_data`` makes the
    data (the signature of ``pipeline.build_data``; e.g. ``matching.build_data`` for the
    embedding matcher, whose batches are embeddings, not tokens); None: pair data for the pair
    objectives, else ``pipeline.build_data``.
    """
    validate(config)
    workdir = os.path.abspath(workdir)
    workdir_lib.check_is_folder(workdir)
    # One run per workdir: process 0 holds the lock until the run ends (a second run stops here,
    # before it reads or writes anything else).
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return _run_locked(config, workdir, stop_at_step=stop_at_step,
                           record_batches=record_batches, build_data=build_data)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(config, workdir: str, *, stop_at_step, record_batches, build_data) -> dict:
    """``run`` while holding the workdir: every check (model, stages, data settings, tokenizer of a
    resume, the data itself) before the first write, then config.json, the checkpointer, the loop."""
    stage_list = stages(config)
    resuming = workdir_lib.check_workdir_compatible(config, workdir)
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0

    mesh_sizes, rules = sharding.resolve(config)
    mesh = sharding.make_mesh(mesh_sizes)
    # Every stage's model, objectives, frozen groups and init_from source are checked before
    # anything is written.
    first = build_steps(stage_config(config, stage_list[0]), mesh, rules=rules)
    recoveries = {}  # stage index -> memory-loss recovery (train.recovery_runs)
    for st in stage_list:
        source = workdir_lib.init_source(st, abstract=True) if str(st.train.init_from) else None
        check_stage(config, st, first.abstract_state.params, source)
        recoveries[st.index] = recovery_lib.for_stage(config.model, st, source and source[1])
    recovery_lib.check(config.train, recoveries)
    config = workdir_lib.with_init_tokenizer(config, stage_list)
    changes = workdir_lib.config_changes(workdir, config) if resuming else []
    restored_tokenizer = None
    saved_steps = workdir_lib.checkpoint_steps(workdir)
    if saved_steps:
        workdir_lib.check_resume_changes(workdir, changes)
        workdir_lib.check_resume_length(workdir, max(saved_steps), stage_list[-1].end)
        restored_tokenizer = workdir_lib.resume_tokenizer(config, workdir)

    tokenizer_path = os.path.join(workdir, workdir_lib.TOKENIZER_FILE)
    build = build_data or (pairs_lib.build_pair_data if pair_data(config) else pipeline.build_data)
    data = build(
        config,
        tokenizer_path=tokenizer_path,
        process_index=process_index,
        process_count=process_count,
        tokenizer=restored_tokenizer,
    )
    # Nothing is written to the workdir before this point (build_data writes the tokenizer only
    # after its own checks passed).
    os.makedirs(workdir, exist_ok=True)
    with contextlib.ExitStack() as resources:  # closed in reverse order whatever happens
        log = workdir_lib.Log(workdir, is_main)
        resources.callback(log.close)
        if is_main:
            if restored_tokenizer is not None:
                restored_tokenizer.save(tokenizer_path)
                log(f"{tokenizer_path} was missing: restored it from the latest checkpoint")
            workdir_lib.write_config(workdir, config)  # always the config the run is using
        if changes:
            log(f"resuming with changed settings: {workdir_lib.describe_changes(changes)}")
        if data.stats.get("replaced_bytes"):
            log(f"data: {data.stats['replaced_bytes']} bytes of invalid UTF-8 in "
                f"{data.stats['source_files']} file(s) were read as U+FFFD")
        writer = metrics_lib.Writer(os.path.join(workdir, workdir_lib.TB_DIR), enabled=is_main)
        resources.callback(writer.close)
        checkpointer = ckpt_lib.Checkpointer(
            os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR),
            keep=int(config.train.keep_checkpoints), log=log)
        resources.callback(checkpointer.close)
        runner = _Runner(config, mesh, rules, stage_list, pad_id=data.tokenizer.pad_id)
        loop = _Loop(config, workdir, runner, data, checkpointer, writer, log,
                     stop_at_step=stop_at_step, record_batches=record_batches, changes=changes,
                     recoveries=recoveries)
        return loop.run()


class Diverged(Exception):
    """Training produced a NaN or an infinity (loss, gradient norm, state or evaluation)."""

    def __init__(self, step: int, what: str):
        super().__init__(f"training diverged at step {step} ({what})")
        self.step, self.what = step, what


def _non_finite(stats: dict) -> str:
    """What is non-finite in one step's host-side stats ('' when nothing is).

    Under loss scaling (float16) a step with a non-finite loss or gradient was skipped (params and
    optimizer state unchanged), which is not divergence; ``MAX_CONSECUTIVE_SKIPS`` skips in a row
    are (halving the scale that often did not help, so the forward itself overflows)."""
    loss, grad_norm = float(stats["loss"]), float(stats["grad_norm"])
    if "skipped" in stats and bool(stats["skipped"]):
        if int(stats["consecutive_skips"]) >= MAX_CONSECUTIVE_SKIPS:
            return (f"{int(stats['consecutive_skips'])} consecutive steps skipped under loss "
                    f"scaling; last loss {loss}, gradient norm {grad_norm}")
        return ""
    if not math.isfinite(loss):
        return f"non-finite loss {loss}"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm {grad_norm}"
    if not bool(stats["finite"]):
        return "non-finite parameters or optimizer state after the update"
    return ""


class _Runner:
    """Builds (and caches) each stage's compiled steps and moves a state into a stage."""

    def __init__(self, config, mesh, rules, stage_list, pad_id):
        self.config, self.mesh, self.rules = config, mesh, rules
        self.stages, self.pad_id = stage_list, int(pad_id)
        self._built: dict[int, Steps] = {}

    def steps(self, stage: Stage) -> Steps:
        if stage.index not in self._built:
            self._built.clear()  # one stage's executables at a time
            self._built[stage.index] = build_steps(
                stage_config(self.config, stage), self.mesh, rules=self.rules, pad_id=self.pad_id,
                offset=stage.start)
        return self._built[stage.index]

    def enter(self, stage: Stage, params, step: int, log) -> TrainState:
        """The state at the start of ``stage``: ``params`` (with its init_from subtrees loaded) and
        a fresh optimizer."""
        steps = self.steps(stage)
        if str(stage.train.init_from):
            source, _ = workdir_lib.init_source(stage)
            host = merge_init_params(jax.device_get(params), source, stage, str(stage.train.init_from))
            params = jax.device_put(host, steps.state_shardings.params)
            log(f"stage {stage.name}: loaded {', '.join(f'{t}<-{s}' for t, s in init_map(stage, source))} "
                f"from {os.path.abspath(str(stage.train.init_from))}")
        frozen = csv_names(stage.train.frozen)
        if len(self.stages) > 1 or frozen:
            log(f"stage {stage.index + 1}/{len(self.stages)} '{stage.name}': {stage.train.objective}, "
                f"steps {stage.start}..{stage.end}" + (f", frozen: {', '.join(frozen)}" if frozen else ""))
        return steps.fresh_state(params, jnp.asarray(step, jnp.int32))


class _Loop:
    """One training run's loop state (stage, train state, pending stats, timing window) and its
    pieces: start or resume, step, log, evaluate, save, change stage, finish."""

    def __init__(self, config, workdir, runner: _Runner, data, checkpointer, writer, log, *,
                 stop_at_step, record_batches, changes=(), recoveries=None):
        self.config, self.workdir, self.runner, self.data = config, workdir, runner, data
        self.recoveries = recoveries or {}
        self.checkpointer, self.writer, self.log = checkpointer, writer, log
        self.stop_at_step, self.record_batches = stop_at_step, record_batches
        self.changes = list(changes)
        self.stage_list = runner.stages
        self.total = self.stage_list[-1].end
        self.tokens_per_step = int(config.train.batch_size) * input_length(config.model)
        self.flops_per_token = flops_lib.flops_per_token(config.model, training=True)
        peak = flops_lib.peak_flops_per_second(jax.devices()[0])
        self.peak_total = peak * jax.device_count() if peak else None
        self.meta = {"config": config.to_dict(),
                     "tokenizer": ckpt_lib.encode_bytes(data.tokenizer.serialized())}
        self.pending: list[tuple[int, dict]] = []  # device-side stats not yet checked on the host
        self.window_start, self.window_steps, self.compile_s = time.time(), 0, None
        self.window = profile_window(config)
        self.tracing = False
        self.stage: Stage
        self.steps: Steps
        self.state: TrainState
        self.last_saved: int | None = None

    # ----------------------------------------------------------------- start

    def start(self) -> None:
        """The stage, compiled steps and state to go on from: the latest checkpoint, or a new init."""
        def restore(step: int):
            stage = stage_at(self.stage_list, step)
            steps = self.runner.steps(stage)
            return stage, steps, self.checkpointer.restore(step, steps.abstract_state)

        found = self.checkpointer.restore_latest(restore)  # older if the newest is damaged
        latest = None if found is None else found[0]
        if found is not None:
            self.stage, self.steps, (self.state, data_state, _) = found[1]
            pipeline.set_iterator_state(self.data.train_iter, data_state)
            self.log(f"resumed from {self.checkpointer.directory} at step {latest}")
            if latest == self.stage.end and self.stage.index + 1 < len(self.stage_list):
                self.stage = self.stage_list[self.stage.index + 1]
                self.state = self.runner.enter(self.stage, self.state.params, latest, self.log)
                self.steps = self.runner.steps(self.stage)
        else:
            config = self.config
            self.stage = self.stage_list[0]
            self.steps = self.runner.steps(self.stage)
            state = self.steps.init(jax.random.key(int(config.seed)))
            self.log(
                f"training {config.name}: {config.model.kind}, "
                f"{sum(x.size for x in jax.tree.leaves(state.params)) / 1e6:.2f}M params, "
                f"{self.total} steps x {self.tokens_per_step} tokens, mesh {dict(self.steps.mesh.shape)}; "
                f"workdir {self.workdir}"
            )
            self.state = self.runner.enter(self.stage, state.params, 0, self.log)
        self.last_saved = latest
        if jax.process_index() == 0:
            workdir_lib.record_start(self.workdir, latest or 0, self.changes)

    # ----------------------------------------------------------------- pieces of a step

    def save(self, step: int) -> None:
        if self.last_saved == step:
            return
        self.checkpointer.save(step, self.state, pipeline.get_iterator_state(self.data.train_iter),
                               dict(self.meta, step=step, stage=self.stage.index,
                                    stage_name=self.stage.name))
        self.last_saved = step

    def flush_pending(self) -> list[tuple[int, dict]]:
        """Pulls pending stats to the host; raises Diverged at the first step whose loss, gradient
        norm or post-update state is not finite."""
        pending, self.pending = self.pending, []
        host = jax.device_get([s for _, s in pending])
        for (step, _), stats in zip(pending, host):
            what = _non_finite(stats)
            if what:
                raise Diverged(step, what)
            for key in ("finite", "skipped", "consecutive_skips"):
                stats.pop(key, None)
        return [(step, stats) for (step, _), stats in zip(pending, host)]

    def next_stage(self, step: int) -> None:
        """Saves the finished stage's last step and enters the next stage."""
        self.flush_pending()
        self.save(step)
        self.stage = self.stage_list[self.stage.index + 1]
        self.state = self.runner.enter(self.stage, self.state.params, step, self.log)
        self.steps = self.runner.steps(self.stage)
        self.compile_s = None

    def restart_window(self) -> None:
        self.window_start, self.window_steps = time.time(), 0

    def train_step(self, step: int, summary: dict) -> int:
        """One optimizer step (with profiling and compile timing); returns the new step."""
        window = self.window
        if window and step == window[0] and not self.tracing:
            trace_dir = os.path.join(self.workdir, workdir_lib.PROFILE_DIR)
            jax.profiler.start_trace(trace_dir)
            self.tracing = True
            self.log(f"profiling steps {window[0]}..{window[1] - 1} into {trace_dir}")
        local = next(self.data.train_iter)
        if self.record_batches:
            summary["batch_digests"].append((step, _digest(local)))
        t0 = time.time()
        self.state, stats = self.steps.train_step(self.state, sharding.global_batch(local, self.steps.mesh))
        step += 1
        self.pending.append((step, stats))
        if self.tracing and (step >= window[1] or step == self.total):
            jax.block_until_ready(stats["loss"])
            jax.profiler.stop_trace()
            self.tracing = False
        if self.compile_s is None:
            jax.block_until_ready(stats["loss"])
            self.compile_s = time.time() - t0
            self.restart_window()
        else:
            self.window_steps += 1
        return step

    def log_train(self, step: int) -> None:
        """Train scalars and the progress line of the last step."""
        checked = self.flush_pending()
        _, last = checked[-1]
        elapsed = time.time() - self.window_start
        window_steps = self.window_steps
        step_s = elapsed / window_steps if window_steps else float("nan")
        tok_s = self.tokens_per_step / step_s if window_steps else float("nan")
        eta = (self.total - step) * step_s
        train_metrics = metrics_lib.summarize_sums(last)
        scalars = {
            "train/loss": float(last["loss"]),
            "train/grad_norm": float(last["grad_norm"]),
            "train/lr": float(last["lr"]),
        }
        scalars.update({f"train/{k}": v for k, v in train_metrics.items()
                        if k not in ("loss", "tokens", "bytes") and not k.endswith(("_tokens", "_bytes"))})
        scalars.update({f"train/{k}": v for k, v in metrics_lib.accounting(
            self.config.model, last, int(self.config.train.batch_size)).items()})
        if len(self.stage_list) > 1:
            scalars["train/stage"] = float(self.stage.index)
        for key in ("loss_scale", "skipped_steps"):  # float16 runs (dynamic loss scaling)
            if key in last:
                scalars[f"train/{key}"] = float(last[key])
        if window_steps:
            scalars.update({"perf/tokens_per_s": tok_s, "perf/step_s": step_s})
            if self.peak_total:
                scalars["perf/mfu"] = flops_lib.mfu(self.flops_per_token, tok_s, self.peak_total)
        self.writer.scalars(step, scalars)
        self.log(
            f"step {step:>6}/{self.total} | loss {float(last['loss']):.4f} | "
            f"lr {float(last['lr']):.2e} | {tok_s / 1e3:.1f}k tok/s | "
            f"{step_s:.3f} s/step | ETA {metrics_lib.format_duration(eta)}"
        )
        self.restart_window()

    def evaluate_checked(self, step: int) -> dict:
        """evaluate_all of the current params; raises Diverged on a non-finite evaluation loss."""
        evals = evaluate_all(self.steps, self.state.params, self.data.eval_batches)
        for name, ev in evals.items():
            if not math.isfinite(float(ev["loss"])):
                raise Diverged(step, f"non-finite evaluation loss {float(ev['loss'])} ({name})")
        return evals

    def evaluate(self, step: int, summary: dict) -> None:
        self.flush_pending()
        evals = self.evaluate_checked(step)
        metrics_lib.log_eval(self.writer, self.log, step, evals)
        summary["evals"] = evals
        summary["eval"] = next(iter(evals.values()))
        loss = float(summary["eval"]["loss"])
        summary.setdefault("eval_history", []).append([step, loss])
        recovery = self.recoveries.get(self.stage.index)
        if recovery is not None:
            value = recovery.at(step, loss)
            if value is not None:
                self.writer.scalars(step, {"eval/memory_recovery": value})
                self.log(f"step {step:>6}/{self.total} | memory-loss recovery rho {value:.4f} "
                         f"({recovery.role} encoder run)")
            summary.setdefault("memory_recovery", {})[self.stage.name] = recovery.summary()
        self.restart_window()

    # ----------------------------------------------------------------- the loop

    def run(self) -> dict:
        self.start()
        summary: dict[str, Any] = {}
        try:
            return self.train(summary)
        except Diverged as e:
            return self.diverged(e, summary)
        finally:
            if self.tracing:  # a trace left running would fail the next run in this process
                jax.profiler.stop_trace()
                self.tracing = False

    def train(self, summary: dict) -> dict:
        t_cfg, total, stop_at_step = self.config.train, self.total, self.stop_at_step
        step = int(jax.device_get(self.state.step))
        summary.update({
            "workdir": self.workdir, "start_step": step, "batch_digests": [],
            "is_main": jax.process_index() == 0,
        })
        with ckpt_lib.PreemptionGuard() as guard:
            while step < total:
                if step == self.stage.end:  # the next curriculum stage
                    self.next_stage(step)
                step = self.train_step(step, summary)
                stop = stop_at_step is not None and step >= stop_at_step
                if step % t_cfg.log_every == 0 or step == total or guard.requested or stop:
                    self.log_train(step)
                if step % t_cfg.eval_every == 0 or step == total:
                    self.evaluate(step, summary)
                if step % t_cfg.checkpoint_every == 0 or step == total or guard.requested or stop:
                    self.flush_pending()
                    self.save(step)
                    self.restart_window()
                if guard.requested or stop:
                    why = guard.requested or f"stop_at_step={stop_at_step}"
                    self.log(f"{why}: saved step {step} in {self.checkpointer.directory}; exiting")
                    summary.update(preempted=True, final_step=step)
                    return summary
        return self.finish(step, summary)

    def finish(self, step: int, summary: dict) -> dict:
        """The final evaluation, the compressors on the same text, the results table and
        results.json."""
        summary.update(
            preempted=False,
            final_step=step,
            compile_s=self.compile_s,
            flops_per_token=self.flops_per_token,
            data=self.data.stats,
        )
        data = self.data
        if "evals" not in summary:
            summary["evals"] = self.evaluate_checked(step)
            summary["eval"] = next(iter(summary["evals"].values()))
        if data.held_out is not None:  # pairs: top-1 by pool size and BM25 instead of compressors
            self.log(metrics_lib.results_table(summary["evals"]))
            summary["retrieval"] = self.evaluate_pools()
            self.log(ranking.retrieval_table(summary["retrieval"], label=str(self.config.model.kind)))
            summary["params"] = self.state.params if step == self.total else None
            self.write_results(summary)
            return summary
        first_objective = next(iter(summary["evals"]))
        baselines = {}
        if "tokens" in data.eval_batches[0]:  # text targets (not the matcher's pools)
            text, _, _ = target_bytes.exact_target_text(
                stage_config(self.config, self.stage), first_objective, data.tokenizer.pad_id,
                data.eval_batches, target_bytes.PieceBytes.from_tokenizer(data.tokenizer),
                summary["eval"]["bytes"])
            baselines = metrics_lib.compressor_bpb(text)
        summary["compressors"] = baselines
        self.log(metrics_lib.results_table(summary["evals"], baselines))
        summary["params"] = self.state.params if step == self.total else None
        self.write_results(summary)
        return summary


    def evaluate_pools(self) -> dict:
        """Top-1 accuracy of the current parameters and of BM25 over pools of held-out pairs."""
        config = self.config
        embed = ranking.row_embedder(self.steps.model, self.state.params, embedding_position(config),
                                     str(config.data.padding))
        return ranking.evaluate_pairs(
            embed, self.data.held_out, sizes=self.data.stats["pool_sizes"],
            queries=int(config.retrieval.eval_queries), seed=int(config.seed),
            batch_size=int(config.train.batch_size), pad_id=self.data.tokenizer.pad_id)

    def write_results(self, summary: dict) -> None:
        if jax.process_index() == 0:
            workdir_lib.write_results(
                self.workdir, {k: v for k, v in summary.items() if k not in ("params", "batch_digests")})

    def diverged(self, e: Diverged, summary: dict) -> dict:
        """Stops a diverged run: one log line naming the step and the last good (saved, hence
        finite) checkpoint; the divergence goes into the summary and results.json. With
        ``train.on_divergence='record'`` the divergence is the run's result (``recorded``): the
        results table says "diverged at step N" and the command exits 0."""
        self.pending = []
        for key in ("eval", "evals"):  # an earlier evaluation is no result of this run
            summary.pop(key, None)
        good = (f"step {self.last_saved} in {self.checkpointer.directory}"
                if self.last_saved is not None else "none")
        recorded = str(self.config.train.on_divergence) == "record"
        message = f"{e}; last good checkpoint: {good}"
        self.log(message)
        diverged = {"step": e.step, "what": e.what, "last_good_step": self.last_saved,
                    "checkpoints": self.checkpointer.directory, "message": message,
                    "recorded": recorded}
        if recorded:
            self.log(metrics_lib.diverged_table(diverged, self.stage.train.objective))
        summary.update(preempted=False, final_step=e.step, params=None, data=self.data.stats,
                       diverged=diverged)
        self.write_results(summary)
        return summary


def _digest(batch: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=8)
    for k in sorted(batch):
        h.update(np.ascontiguousarray(batch[k]).tobytes())
    return h.hexdigest()
