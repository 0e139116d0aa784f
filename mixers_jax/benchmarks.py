"""Benchmark suites (the library of ``python -m mixers_jax.bench``).

Each suite prints a table row per case as it finishes and returns one record per case. Compare
figures as ratios *within one run*: the machines are shared and noisy. Timings are medians over
``Settings.steps`` repetitions after one warm-up call; compile time is the ``lower().compile()``
wall time.

* ``train``: one optimizer step (forward, backward, AdamW) of the flat, headed and Toeplitz mixers
  and the transformer at equal width, depth and context (``mixer_flat`` with the default
  ``mixing_impl='auto'``, ``mixer_flat_dense`` / ``mixer_flat_blocked`` with each implementation,
  and their step-time ratio): step time, tokens/s, compile time, the
  compiled step's memory (XLA memory analysis; the allocator's peak on accelerators), analytic
  FLOPs per token next to XLA's cost analysis, and MFU where the device's peak is known. The suite
  first measures the machine's own yardstick in the same run, the FLOP/s of one XLA 1024×1024
  matmul in the suite's dtype (:func:`matmul_rate`), and reports each case's training FLOP rate
  (analytic FLOPs per token × tokens/s) as a fraction of it (``matmul_fraction``; the yardstick is
  measured again after every case and each case uses the mean of the rates before and after it),
  so that figures compare across machines of different speed. ``compile_s`` is the first step's
  compile time (lowering included); ``--scan_layers`` compiles the blocks as one scanned block.
* ``mixing``: one token-mixing op (forward + backward) for each implementation (dense masked
  matmul, the lower block triangle only, Toeplitz materialised, Toeplitz by FFT) over contexts
  256 ... 4096.
* ``generate``: tokens/s (batch × new tokens / wall time of one compiled ``lax.scan`` generating
  ``--new_tokens`` greedy tokens from a one-token prompt) and memory (the compiled generation's XLA
  memory analysis, and the bytes of the carried cache/state) of a structured recurrent mixer
  (mixed heads, SRM block) generating ``recurrent`` (O(d) state), ``cached`` (mixing inputs) and
  ``full`` (parallel forward per token), of the flat masked mixer (``cached``) and of the
  transformer with a KV cache at the same width and depth, for each n_ctx in ``--gen_contexts`` and
  batch in ``--gen_batches``. Cases: srm_recurrent, srm_cached, srm_full, mixer_cached,
  transformer_cached.
* ``remat``: one optimizer step of the flat mixer and the transformer under each
  rematerialisation policy (``train.remat``: none, block, matmuls_saved): step time, its ratio to
  'none' in the same run, and the compiled step's temporaries (activations) per device.
* ``context_memory``: one forward + backward pass (the clm loss and its parameter gradients, no
  optimizer) of the flat mixer and the transformer at each context length in ``--contexts``,
  compiled only (nothing is allocated): XLA's memory analysis of arguments (parameters, tokens),
  outputs (gradients) and temporaries, their sum as the peak, and transformer / mixer per n.
* ``memory``: one optimizer step (next-token objective) of a memory model with s chunks of
  ``--n_ctx`` tokens vs the full-context model of the same family over the same s·n_ctx tokens, for
  each s in ``--chunks`` (cases memory_mixer, full_mixer, memory_transformer, full_transformer):
  step time, tokens/s, memory, FLOPs; the memory / full-context step-time ratio per s.
* ``memory_generate``: greedy generation over a whole row of s chunks (cached steps; the memory
  model encodes each finished chunk once and restarts its decoder on the memory slots) vs the
  full-context mixer over the same s·n_ctx tokens, for each s in ``--chunks`` and batch in
  ``--gen_batches``: tokens/s, compile time and the bytes of the carried state; cases
  memory_mixer, full_mixer.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax import flops as flops_lib
from mixers_jax import objectives, sharding
from mixers_jax import steps as steps_lib
from mixers_jax import workdir as workdir_lib
from mixers_jax.config import base_config, input_length
from mixers_jax.generation import Generator
from mixers_jax.models import build_model, mixing_blocked, mixing_math
from mixers_jax.models.layers import REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes shared by the suites (the train suite's model; the mixing suite reads ``d_model`` as
    its feature count, the memory suite ``n_ctx`` as the chunk length)."""

    d_model: int = 256
    n_layers: int = 4
    n_ctx: int = 512
    batch: int = 8
    vocab: int = 4096
    heads: int = 4
    dtype: str = "float32"
    steps: int = 5  # timed repetitions per case (median reported)
    new_tokens: int = 32  # generate suite: new tokens per row
    scan_layers: bool = False  # train suite: model.scan_layers


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(dtype: str = "float32", repeats: int = 5, size: int = 1024) -> float:
    """FLOP/s of one jitted XLA ``size``×``size`` matmul on the default device (2·size³ FLOPs per
    product; median of ``repeats`` after a warm-up)."""
    a_NxN = jax.random.normal(jax.random.key(0), (size, size), jnp.float32).astype(dtype)
    product = jax.jit(lambda x: x @ x)
    return 2.0 * size**3 / _median_time(lambda: product(a_NxN), repeats)


def _memory_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


def _cost_flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0]
        return float(cost["flops"])
    except Exception:  # noqa: BLE001
        return None


TRAIN_CASES = {
    "mixer_flat": dict(kind="mixer", mixing="flat", heads=0),  # mixing_impl 'auto'
    "mixer_flat_dense": dict(kind="mixer", mixing="flat", heads=0, mixing_impl="dense"),
    "mixer_flat_blocked": dict(kind="mixer", mixing="flat", heads=0, mixing_impl="blocked"),
    "mixer_headed": dict(kind="mixer", mixing="flat", heads=-1),  # -1: --heads
    "mixer_toeplitz": dict(kind="mixer", mixing="toeplitz", heads=0, mixing_impl="dense"),
    "mixer_toeplitz_fft": dict(kind="mixer", mixing="toeplitz", heads=0, mixing_impl="fft"),
    "transformer": dict(kind="transformer"),
}


def bench_train(cases: list[str], s: Settings) -> list[dict]:
    rate = matmul_rate(s.dtype, s.steps)
    print(f"# XLA 1024x1024 {s.dtype} matmul: {rate / 1e9:.1f} GFLOP/s per device "
          f"(x{jax.device_count()} devices)")
    records = []
    for name in cases:
        spec = dict(TRAIN_CASES[name])
        if spec.get("heads") == -1:
            spec["heads"] = s.heads
        config = base_config()
        config.model.update(
            dict(d_model=s.d_model, n_layers=s.n_layers, n_ctx=s.n_ctx, vocab_size=s.vocab,
                 n_heads=s.heads, dtype=s.dtype, scan_layers=s.scan_layers, **spec)
        )
        rec = _time_train_step(name, config, s)
        # the yardstick again right after the case: on a shared machine the load drifts, so each
        # case is compared with the mean of the rates measured before and after it
        after = matmul_rate(s.dtype, s.steps)
        rec["matmul_flops_per_s"] = (rate + after) / 2
        rec["flop_rate"] = rec["flops_per_token"] * rec["tokens_per_s"]
        rec["matmul_fraction"] = rec["flop_rate"] / (rec["matmul_flops_per_s"] * jax.device_count())
        rate = after
        records.append(rec)
        _print_row(rec, ["case", "step_s", "tokens_per_s", "compile_s", "memory_bytes",
                         "flops_per_token", "xla_flops_per_token", "matmul_fraction", "mfu"])
    base = {r["case"]: r for r in records}
    if "mixer_flat" in base and "transformer" in base:
        ratio = base["transformer"]["step_s"] / base["mixer_flat"]["step_s"]
        print(f"transformer step time / flat mixer step time = {ratio:.2f}")
    if "mixer_flat_dense" in base and "mixer_flat_blocked" in base:
        ratio = base["mixer_flat_dense"]["step_s"] / base["mixer_flat_blocked"]["step_s"]
        print(f"flat mixer dense step time / blocked step time = {ratio:.2f}")
    return records


def _compiled_train_step(config, batch: int) -> tuple[Callable[[], object], float, object, dict]:
    """``config``'s optimizer step compiled for ``batch`` rows of random tokens on all devices
    (data-parallel): (one_step, compile seconds, the compiled executable, {"state": ...})."""
    config.train.update(dict(batch_size=batch, steps=10**6, warmup_steps=10))
    config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    mesh = sharding.make_mesh(config.mesh)
    steps = steps_lib.build_steps(config, mesh)
    state = steps.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    n, v = input_length(config.model), int(config.model.vocab_size)
    local = {
        "tokens": rng.integers(3, v, (batch, n), dtype=np.int32),
        "loss_mask": np.ones((batch, n), np.float32),
        "token_bytes": np.full((batch, n), 4, np.int32),
    }
    batch_arrays = sharding.global_batch(local, mesh)
    t0 = time.perf_counter()
    compiled = steps.train_step.lower(state, batch_arrays).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def one_step():
        holder["state"], stats = compiled(holder["state"], batch_arrays)
        return stats["loss"]

    return one_step, compile_s, compiled, holder


def _time_train_step(name: str, config, s: Settings) -> dict:
    """Median time of one compiled optimizer step of ``config`` on random tokens, with its
    compile time, memory, analytic and XLA FLOPs per token, parameters and MFU where known."""
    one_step, compile_s, compiled, holder = _compiled_train_step(config, s.batch)
    b, n = s.batch, input_length(config.model)
    step_s = _median_time(one_step, s.steps)
    tokens = b * n
    analytic = flops_lib.flops_per_token(config.model, training=True)
    xla = _cost_flops(compiled)
    rec = {
        "case": name,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "compile_s": compile_s,
        "memory_bytes": _memory_bytes(compiled),
        "temp_bytes": _temp_bytes(compiled),
        "flops_per_token": analytic,
        "xla_flops_per_token": xla / tokens if xla else None,
        "params": int(sum(x.size for x in jax.tree.leaves(holder["state"].params))),
    }
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        rec["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    peak = flops_lib.peak_flops_per_second(jax.devices()[0])
    if peak:
        rec["mfu"] = flops_lib.mfu(analytic, rec["tokens_per_s"], peak * jax.device_count())
    return rec


def _case_config(spec: dict, s: Settings, n_ctx: int | None = None):
    """The base config with the settings' model sizes and ``spec``'s model fields."""
    config = base_config()
    config.model.update(dict(d_model=s.d_model, n_layers=s.n_layers, n_ctx=n_ctx or s.n_ctx,
                             vocab_size=s.vocab, n_heads=s.heads, dtype=s.dtype, **spec))
    return config


REMAT_MODELS = {"mixer": TRAIN_CASES["mixer_flat"], "transformer": TRAIN_CASES["transformer"]}
REMAT_CASES = tuple(f"{m}_{p}" for m in REMAT_MODELS for p in REMAT_POLICIES)


RUN_STEPS_PER_ROUND = 3


def bench_runs(workdirs: list[str], s: Settings) -> list[dict]:
    """The train steps of finished runs timed in turn: each run's saved config (config.json) at
    its own batch size, on random tokens, all compiled first; then ``s.steps`` rounds, in each
    every run timed for RUN_STEPS_PER_ROUND steps (after one warm-up step) in turn (A, B, A, B, ...), so that a drift in
    the machine's load reaches every run alike. step_s: the median of the rounds' medians. The
    ratio of two runs' step_s is what an equal-wall-time comparison needs
    (docs/results.md); their absolute values are only as good as the machine is quiet."""
    prepared = []
    for workdir in workdirs:
        config = workdir_lib.load_config(workdir)
        batch = int(config.train.batch_size)
        one_step, compile_s, _, _ = _compiled_train_step(config, batch)
        prepared.append((workdir, one_step, compile_s, batch * input_length(config.model)))
    rounds: list[list[float]] = [[] for _ in prepared]
    for _ in range(s.steps):
        for times, (_, one_step, _, _) in zip(rounds, prepared):
            times.append(_median_time(one_step, RUN_STEPS_PER_ROUND))
    records = []
    for times, (workdir, _, compile_s, tokens) in zip(rounds, prepared):
        step_s = statistics.median(times)
        rec = {"case": workdir, "step_s": step_s, "tokens_per_s": tokens / step_s,
               "compile_s": compile_s, "rounds": times}
        records.append(rec)
        _print_row(rec, ["case", "step_s", "tokens_per_s", "compile_s"])
    for rec in records[1:]:
        print(f"{rec['case']} step time / {records[0]['case']} step time = "
              f"{rec['step_s'] / records[0]['step_s']:.3f}")
    return records


def bench_remat(cases: list[str], s: Settings) -> list[dict]:
    """Optimizer-step time and temporaries of each rematerialisation policy, with the step-time
    ratio to the same model's 'none' in the same run."""
    records = []
    for name in cases:
        model, policy = next((m, name[len(m) + 1:]) for m in REMAT_MODELS if name.startswith(m + "_"))
        config = _case_config(REMAT_MODELS[model], s)
        config.train.remat = policy
        rec = dict(_time_train_step(name, config, s), model=model, remat=policy)
        base = next((r for r in records if r["model"] == model and r["remat"] == "none"), None)
        rec["step_vs_none"] = rec["step_s"] / base["step_s"] if base else None
        rec["temp_vs_none"] = (rec["temp_bytes"] / base["temp_bytes"]
                               if base and base["temp_bytes"] and rec["temp_bytes"] else None)
        records.append(rec)
        _print_row(rec, ["case", "step_s", "step_vs_none", "tokens_per_s", "temp_bytes",
                         "temp_vs_none", "compile_s"])
    return records


CONTEXT_MEMORY_CASES = REMAT_MODELS


def forward_backward_memory(config, batch: int) -> dict:
    """XLA's memory analysis of one compiled forward + backward (clm loss, parameter gradients)
    of ``config.model`` on ``batch`` rows, from shapes only."""
    model = build_model(config.model)
    n = input_length(config.model)
    tokens = jax.ShapeDtypeStruct((batch, n), jnp.int32)
    params = jax.eval_shape(lambda: nn.meta.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, n), jnp.int32))["params"]))
    loss_fn = objectives.build("clm", objectives.ObjectiveContext(config.model, config.train))

    def loss(p, tokens):
        b = {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32),
             "token_bytes": jnp.ones(tokens.shape, jnp.int32)}
        return loss_fn(lambda q, t, rngs=None: model.apply({"params": q}, t), p, b)[0]

    t0 = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
    m = compiled.memory_analysis()
    return {"params_bytes": int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))),
            "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
            "peak_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                              + m.temp_size_in_bytes - m.alias_size_in_bytes),
            "compile_s": time.perf_counter() - t0}


def bench_context_memory(cases: list[str], contexts: list[int], s: Settings) -> list[dict]:
    """Peak bytes of one forward + backward of the flat mixer and the transformer per context
    length (published: the mixer about 4x more memory-efficient at long n;
    docs/published_results.md#causal-language-models)."""
    records = []
    for n in contexts:
        for name in cases:
            config = _case_config(CONTEXT_MEMORY_CASES[name], s, n_ctx=n)
            rec = dict(case=name, n_ctx=n, batch=s.batch, **forward_backward_memory(config, s.batch))
            records.append(rec)
            _print_row(rec, ["case", "n_ctx", "params_bytes", "temp_bytes", "peak_bytes", "compile_s"])
    by = {(r["case"], r["n_ctx"]): r for r in records}
    for n in contexts:
        mixer, transformer = by.get(("mixer", n)), by.get(("transformer", n))
        if mixer and transformer:
            print(f"n_ctx {n}: transformer peak / mixer peak = "
                  f"{transformer['peak_bytes'] / mixer['peak_bytes']:.2f}")
    return records


MEMORY_CASES = {
    "memory_mixer": dict(kind="memory"),
    "full_mixer": dict(kind="mixer"),
    "memory_transformer": dict(kind="memory", encoder={"kind": "transformer"},
                               decoder={"kind": "transformer"}),
    "full_transformer": dict(kind="transformer"),
}


def bench_memory(cases: list[str], chunk_counts: list[int], s: Settings) -> list[dict]:
    """Training-step time of memory models (s chunks of n_ctx) vs full-context models over the same
    s·n_ctx tokens, for each s (published: memory models ≈20–25% slower per step at s = 4;
    docs/published_results.md#memory-models)."""
    records = []
    for k in chunk_counts:
        for name in cases:
            spec = dict(MEMORY_CASES[name])
            config = base_config()
            full = spec["kind"] != "memory"
            for role in ("encoder", "decoder"):
                config.model[role].update(spec.pop(role, {}))
            config.model.update(dict(
                d_model=s.d_model, n_layers=s.n_layers, vocab_size=s.vocab, n_heads=s.heads,
                dtype=s.dtype, chunks=k, n_ctx=s.n_ctx * k if full else s.n_ctx, **spec))
            config.train.objective = "clm"
            rec = dict(_time_train_step(name, config, s), chunks=k, chunk_len=s.n_ctx,
                       total_tokens=k * s.n_ctx)
            records.append(rec)
            _print_row(rec, ["case", "chunks", "total_tokens", "step_s", "tokens_per_s",
                             "memory_bytes", "flops_per_token"])
    by = {(r["case"], r["chunks"]): r for r in records}
    for k in chunk_counts:
        for kind in ("mixer", "transformer"):
            mem, full = by.get((f"memory_{kind}", k)), by.get((f"full_{kind}", k))
            if mem and full:
                print(f"s={k}: memory {kind} step time / full-context {kind} step time = "
                      f"{mem['step_s'] / full['step_s']:.2f}")
    return records


def bench_mixing(contexts: list[int], s: Settings, cases: list[str] | None = None) -> list[dict]:
    b, d = s.batch, s.d_model
    records = []
    impls = {
        "flat_dense": lambda p, x: mixing_math.dense_causal_mix(p, x),
        "flat_blocked": lambda p, x: mixing_blocked.blocked_mix(
            p, x, mixing_blocked.block_size(x.shape[1])),
        "toeplitz_dense": lambda p, x: mixing_math.toeplitz_mix_dense(p, x),
        "toeplitz_fft": lambda p, x: mixing_math.toeplitz_mix_fft(p, x),
    }
    for n in contexts:
        key = jax.random.key(n)
        x = jax.random.normal(key, (b, n, d), jnp.dtype(s.dtype))
        for name, fn in impls.items():
            if cases and name not in cases:
                continue
            p = (jax.random.normal(key, (n, n)) if name.startswith("flat")
                 else jax.random.normal(key, (n,)))
            p = p.astype(x.dtype)

            def loss(p, x, fn=fn):
                return jnp.sum(fn(p, x).astype(jnp.float32) ** 2)

            step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            t0 = time.perf_counter()
            compiled = step.lower(p, x).compile()
            compile_s = time.perf_counter() - t0
            rec = {
                "case": name, "n_ctx": n, "batch": b, "features": d,
                "fwd_bwd_s": _median_time(lambda: compiled(p, x), s.steps),
                "compile_s": compile_s,
                "memory_bytes": _memory_bytes(compiled),
                "xla_flops": _cost_flops(compiled),
            }
            records.append(rec)
            _print_row(rec, ["case", "n_ctx", "fwd_bwd_s", "compile_s", "memory_bytes", "xla_flops"])
    return records


MIXING_CASES = ("flat_dense", "flat_blocked", "toeplitz_dense", "toeplitz_fft")

GEN_CASES = {
    "srm_recurrent": (dict(kind="mixer", mixing="mixed", block="srm"), "recurrent"),
    "srm_cached": (dict(kind="mixer", mixing="mixed", block="srm"), "cached"),
    "srm_full": (dict(kind="mixer", mixing="mixed", block="srm"), "full"),
    "mixer_cached": (dict(kind="mixer"), "cached"),  # the flat masked mixer
    "transformer_cached": (dict(kind="transformer"), "cached"),
}


def _time_generation(gen: Generator, batch: int, steps: int, s: Settings) -> dict:
    """Greedy generation of ``steps`` tokens after a one-token prompt in ``batch`` rows: tokens/s,
    compile time, the compiled scan's memory and the bytes of the carried cache (0 for 'full')."""
    prompts = [[3]] * batch
    t0 = time.perf_counter()
    compiled = gen.lower_advance(gen.start(prompts), steps).compile()
    compile_s = time.perf_counter() - t0
    state_bytes = (sum(x.size * x.dtype.itemsize
                       for x in jax.tree.leaves(gen.model.init_cache(batch, gen.mode)))
                   if gen.mode != "full" else 0)

    def once():
        return compiled(gen.start(prompts), gen.params)["tokens"]

    wall = _median_time(once, s.steps)
    rec = {"new_tokens": steps, "tokens_per_s": batch * steps / wall, "s_per_token": wall / steps,
           "compile_s": compile_s, "memory_bytes": _memory_bytes(compiled),
           "state_bytes": state_bytes}
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        rec["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    return rec


def bench_generate(cases: list[str], contexts: list[int], batches: list[int], s: Settings) -> list[dict]:
    records = []
    new = s.new_tokens
    for n in contexts:
        for name in cases:
            spec, mode = GEN_CASES[name]
            cfg = base_config().model
            cfg.update(dict(d_model=s.d_model, n_layers=s.n_layers, n_ctx=n, vocab_size=s.vocab,
                            heads=s.heads, n_heads=s.heads, dtype=s.dtype, **spec))
            model = build_model(cfg)
            params = nn.meta.unbox(
                jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, n), jnp.int32))["params"])
            gen = Generator(model, params, cfg, mode=mode, temperature=0.0)
            for b in batches:
                rec = {"case": name, "mode": mode, "n_ctx": n, "batch": b,
                       **_time_generation(gen, b, min(new, n - 1), s)}
                records.append(rec)
                _print_row(rec, ["case", "n_ctx", "batch", "tokens_per_s", "s_per_token",
                                 "compile_s", "memory_bytes", "state_bytes"])
    by = {(r["case"], r["n_ctx"], r["batch"]): r for r in records}
    for n in contexts:
        for b in batches:
            rec, full = by.get(("srm_recurrent", n, b)), by.get(("srm_full", n, b))
            tr = by.get(("transformer_cached", n, b))
            if rec and full:
                print(f"n_ctx {n} batch {b}: recurrent / full-recompute tokens/s = "
                      f"{rec['tokens_per_s'] / full['tokens_per_s']:.1f}x")
            if rec and tr:
                print(f"n_ctx {n} batch {b}: recurrent / transformer KV-cache tokens/s = "
                      f"{rec['tokens_per_s'] / tr['tokens_per_s']:.2f}x")
    return records


MEMGEN_CASES = ("memory_mixer", "full_mixer")


def bench_memory_generate(cases: list[str], chunk_counts: list[int], batches: list[int],
                          s: Settings) -> list[dict]:
    """Greedy generation over a whole row of s chunks of n_ctx tokens (s·n_ctx − 1 new tokens after
    a one-token prompt, cached steps): the memory mixer (decoder at the settings' width and depth,
    encoder at half of each with k = 4 taps, the proportions of configs/memory.py:cpu) vs the
    full-context mixer over s·n_ctx tokens (the settings' width and depth), for each s. Random
    weights: the speed does not depend on training."""
    records = []
    for k in chunk_counts:
        total = k * s.n_ctx
        for name in cases:
            cfg = base_config().model
            full = name == "full_mixer"
            cfg.update(dict(kind="mixer" if full else "memory", d_model=s.d_model,
                            n_layers=s.n_layers, vocab_size=s.vocab, heads=s.heads,
                            n_heads=s.heads, dtype=s.dtype, chunks=k,
                            n_ctx=total if full else s.n_ctx))
            if not full:
                cfg.encoder.update(dict(d_model=max(s.d_model // 2, s.heads),
                                        n_layers=max(s.n_layers // 2, 1), kernel=4))
            model = build_model(cfg)
            params = nn.meta.unbox(jax.jit(model.init)(
                jax.random.key(0), jnp.zeros((1, total), jnp.int32))["params"])
            gen = Generator(model, params, cfg, mode="cached", temperature=0.0)
            for b in batches:
                rec = {"case": name, "chunks": k, "chunk_len": s.n_ctx, "total_tokens": total,
                       "batch": b, **_time_generation(gen, b, total - 1, s)}
                records.append(rec)
                _print_row(rec, ["case", "chunks", "total_tokens", "batch", "tokens_per_s",
                                 "compile_s", "state_bytes"])
    by = {(r["case"], r["chunks"], r["batch"]): r for r in records}
    for k in chunk_counts:
        for b in batches:
            mem, full = by.get(("memory_mixer", k, b)), by.get(("full_mixer", k, b))
            if mem and full:
                print(f"s={k} batch {b}: memory / full-context tokens/s = "
                      f"{mem['tokens_per_s'] / full['tokens_per_s']:.2f}x, state bytes = "
                      f"{mem['state_bytes'] / full['state_bytes']:.2f}x")
    return records


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


_printed_header = set()


def _print_row(rec: dict, cols: list[str]) -> None:
    key = tuple(cols)
    if key not in _printed_header:
        print(" | ".join(f"{c:>20}" for c in cols))
        _printed_header.add(key)
    print(" | ".join(f"{_fmt(rec.get(c)):>20}" for c in cols), flush=True)
