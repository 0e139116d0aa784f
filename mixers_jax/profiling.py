"""Profiling and ahead-of-time checks of the train step (the library of ``python -m mixers_jax.profile``).

:func:`profile` runs the analyses named in ``what`` and writes their files under ``out_dir``:

  jaxpr   the jaxpr of the train step and of the forward pass -> {train_step,forward}.jaxpr.txt
  hlo     their optimized (compiled) HLO -> {train_step,forward}.hlo.txt
  cost    FLOPs per primitive counted from the jaxpr (every dot_general and conv with its shapes),
          beside the analytic count (flops.py) and XLA's cost analysis -> flops.json
  memory  the compiled step's memory analysis per device (arguments, outputs, temporaries)
  trace   a jax.profiler trace of ``n_steps`` real steps (random tokens) -> trace/ (TensorBoard's
          profile tab), the step time, MFU, and the device time split by op kind
  aot     lower and compile the train step for ``mesh_text`` on fake CPU devices (the process must
          have been started with that many; see the command) and report per-device parameter,
          optimizer and activation memory without allocating anything

Only ``trace`` allocates parameters; every other analysis works from shapes alone.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import time
from collections import defaultdict
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from mixers_jax import compile_log
from mixers_jax import flops as flops_lib
from mixers_jax import sharding, trainer
from mixers_jax import steps as steps_lib
from mixers_jax.config import input_length
from mixers_jax.errors import UserError

WHATS = ("jaxpr", "hlo", "cost", "memory", "trace", "aot")


# --------------------------------------------------------------------------- building


def setup(config, mesh_text: str | None = None, devices=None):
    """(steps, abstract state, abstract global batch) for ``config`` on the requested mesh.

    Nothing is allocated: the state and the batch are ShapeDtypeStructs carrying shardings.
    """
    trainer.validate(config)
    sizes, rules = sharding.resolve(config)
    if mesh_text:
        sizes = sharding.parse_mesh(mesh_text)
        n = int(np.prod(list(sizes.values())))
        devices = devices if devices is not None else jax.devices()
        if len(devices) < n:
            raise UserError(f"--mesh={mesh_text} needs {n} devices, but {len(devices)} are available")
        devices = list(devices)[:n]
    mesh = sharding.make_mesh(sizes, devices)
    steps = steps_lib.build_steps(config, mesh, rules=rules)
    rows, n_ctx = int(config.train.batch_size), input_length(config.model)  # s·n for memory models
    bsh = sharding.batch_sharding(mesh)
    batch = {
        "tokens": jax.ShapeDtypeStruct((rows, n_ctx), jnp.int32, sharding=bsh),
        "loss_mask": jax.ShapeDtypeStruct((rows, n_ctx), jnp.float32, sharding=bsh),
        "token_bytes": jax.ShapeDtypeStruct((rows, n_ctx), jnp.int32, sharding=bsh),
    }
    return steps, steps.abstract_state, batch


def compile_logged(fn, *args):
    """(``fn.lower(*args).compile()``, the :class:`~mixers_jax.compile_log.CompileLog` of XLA's
    log during that compile)."""
    with compile_log.capture() as log:
        compiled = fn.lower(*args).compile()
    return compiled, log


def remats_text(count: int | None) -> str:
    """The involuntary-rematerialization count as the AOT table shows it."""
    return "n/a" if count is None else str(count)


def forward_fn(steps):
    def forward(params, tokens):
        return steps.model.apply({"params": params}, tokens)

    return jax.jit(forward, in_shardings=(steps.state_shardings.params, None))


# --------------------------------------------------------------------------- FLOPs from a jaxpr


def _dot_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    rhs_free = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
    return 2.0 * float(np.prod(lhs)) * float(np.prod(rhs_free))


def _conv_flops(eqn) -> float:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    rhs_spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
    k_in = rhs[rhs_spec[1]]
    k_spatial = float(np.prod([rhs[i] for i in rhs_spec[2:]]))
    return 2.0 * float(np.prod(out)) * k_in * k_spatial


def _sub_jaxprs(eqn):
    """(jaxpr, multiplicity) of the sub-computations of a higher-order primitive."""
    name = eqn.primitive.name
    mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
    if name == "cond":
        yield max(eqn.params["branches"], key=lambda j: count_flops(j)["total"]).jaxpr, 1.0
        return
    for value in eqn.params.values():
        vals = value if isinstance(value, (tuple, list)) else (value,)
        for v in vals:
            if isinstance(v, jex_core.ClosedJaxpr):
                yield v.jaxpr, mult
            elif isinstance(v, jex_core.Jaxpr):
                yield v, mult


def count_flops(jaxpr) -> dict[str, Any]:
    """Matmul FLOPs (2 per multiply-add) of every dot_general and conv in ``jaxpr``, recursively.

    Returns {'total': float, 'by_primitive': {name: flops}, 'ops': [(primitive, shapes, flops)]}.
    A scan body counts ``length`` times; a cond its most expensive branch; a while body once.
    """
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    by_prim: dict[str, float] = defaultdict(float)
    ops: dict[tuple, list] = {}
    for eqn in inner.eqns:
        name = eqn.primitive.name
        if name in ("dot_general", "conv_general_dilated"):
            f = _dot_flops(eqn) if name == "dot_general" else _conv_flops(eqn)
            by_prim[name] += f
            shapes = " x ".join(str(tuple(v.aval.shape)) for v in eqn.invars[:2])
            key = (name, shapes, str(eqn.outvars[0].aval.dtype))
            ops.setdefault(key, [0, 0.0])
            ops[key][0] += 1
            ops[key][1] += f
            continue
        for sub, mult in _sub_jaxprs(eqn):
            r = count_flops(sub)
            for k, v in r["by_primitive"].items():
                by_prim[k] += mult * v
            for (p, s, dt, c, f) in r["ops"]:
                key = (p, s, dt)
                ops.setdefault(key, [0, 0.0])
                ops[key][0] += int(c * mult)
                ops[key][1] += f * mult
    return {
        "total": float(sum(by_prim.values())),
        "by_primitive": dict(by_prim),
        "ops": [(p, s, dt, c, f) for (p, s, dt), (c, f) in sorted(ops.items(), key=lambda kv: -kv[1][1])],
    }


def train_step_jaxpr(steps, state, batch):
    return jax.make_jaxpr(steps.train_step)(state, batch)


def forward_jaxpr(steps, state, batch):
    return jax.make_jaxpr(forward_fn(steps))(state.params, batch["tokens"])


def xla_cost(compiled) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
        cost = cost[0] if cost else {}
    return {k: float(v) for k, v in (cost or {}).items() if k in ("flops", "bytes accessed", "transcendentals")}


def memory_report(compiled) -> dict[str, int | None]:
    """Per-device bytes of the compiled program (XLA's memory analysis; None where unsupported)."""
    m = compiled.memory_analysis()
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
    return {k: (int(getattr(m, k)) if m is not None and hasattr(m, k) else None) for k in keys}


def state_bytes_per_device(abstract_state) -> dict[str, int]:
    """Bytes of parameters and optimizer state on the most loaded device, from the shardings."""
    def per_device(tree):
        total = 0
        for leaf in jax.tree.leaves(tree):
            shard = leaf.sharding.shard_shape(leaf.shape)
            total += int(np.prod(shard)) * leaf.dtype.itemsize
        return total

    return {"params": per_device(abstract_state.params), "opt_state": per_device(abstract_state.opt_state)}


# --------------------------------------------------------------------------- trace


_KINDS = (
    ("collective", re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective|nccl|psum", re.I)),
    ("matmul", re.compile(r"dot|gemm|cublas|matmul|convolution|conv|cutlass|nvjet|xmma", re.I)),
    ("fft", re.compile(r"fft", re.I)),
    ("copy/transpose", re.compile(r"copy|transpose|memcpy|memset", re.I)),
    ("fusion", re.compile(r"fusion|loop_|input_|reduce", re.I)),
)


def op_kind(name: str) -> str:
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return "other"


_HLO_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_HLO_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\((.*)$")
_COPY_OPS = {"copy", "transpose", "bitcast", "parameter", "tuple", "get-tuple-element"}


def hlo_op_kinds(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op kind for the instructions of a compiled module's text (``as_text()``).

    A fusion takes the kind of what it computes: 'matmul' when its computation holds a dot or a
    convolution (XLA:CPU also wraps reductions and elementwise work in its library fusions, so a
    fusion's name says nothing), 'copy/transpose' when it only moves data, else 'fusion'; other
    instructions are classified by their opcode (:func:`op_kind`)."""
    bodies: dict[str, set[str]] = {}
    rows: list[tuple[str, str, str]] = []
    current = None
    for line in hlo_text.splitlines():
        head = _HLO_COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            bodies[current] = set()
            continue
        inst = _HLO_INSTRUCTION.match(line)
        if inst and current is not None:
            name, opcode, rest = inst.groups()
            bodies[current].add(opcode)
            rows.append((name, opcode, rest))
    kinds = {}
    for name, opcode, rest in rows:
        if opcode == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            ops = bodies.get(called.group(1), set()) if called else set()
            kinds[name] = ("matmul" if ops & {"dot", "convolution"} else
                           "copy/transpose" if ops <= _COPY_OPS else "fusion")
        else:
            kinds[name] = op_kind(opcode)
    return kinds


def summarize_trace(trace_dir: str, op_kinds: dict[str, str] | None = None) -> dict[str, Any]:
    """Device time split by op kind, from the Perfetto JSON the profiler writes beside the xplane.

    Device events are those of processes named like '/device:GPU:0' or 'TPU:0'; when there are none
    (CPU), the host's XLA op events are used: 'XLA Ops' threads, or, for a module compiled with
    ``xla_cpu_enable_xprof_traceme`` (:func:`run_trace` does that on CPU), the events of the XLA
    worker threads named like one of ``op_kinds``'s instructions (:func:`hlo_op_kinds`, which also
    gives their kinds; the executor's enclosing events are not ops and are left out).
    """
    files = []
    for root, _, names in os.walk(trace_dir):
        files += [os.path.join(root, n) for n in names if n.endswith(".trace.json.gz") or n == "perfetto_trace.json.gz"]
    if not files:
        return {"error": f"no trace JSON under {trace_dir}"}
    with gzip.open(sorted(files)[-1], "rt", encoding="utf-8") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pnames, tnames = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            pnames[e["pid"]] = str(e.get("args", {}).get("name", ""))
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            tnames[(e["pid"], e.get("tid"))] = str(e.get("args", {}).get("name", ""))
    device_pids = {p for p, n in pnames.items() if re.search(r"/device:(GPU|TPU)|TPU:\d", n)}
    if device_pids:
        threads = {k: n for k, n in tnames.items() if k[0] in device_pids}
        op_threads = {k for k, n in threads.items() if "xla ops" in n.lower()}
        if not op_threads:  # kernels on the streams; skip the module / step summary lines
            op_threads = {k for k, n in threads.items() if not re.search(r"module|step", n, re.I)}
        source = "device"
    else:
        op_threads = {k for k, n in tnames.items() if "xla op" in n.lower()}
        if op_kinds:
            op_threads |= {k for k, n in tnames.items() if re.search(r"xla|eigen", n, re.I)}
        source = "host XLA ops"
    keep = lambda e: (e.get("pid"), e.get("tid")) in op_threads  # noqa: E731
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and keep(e):
            name = str(e.get("name", ""))
            if op_kinds and not device_pids:
                if name in op_kinds:
                    totals[op_kinds[name]] += float(e["dur"])
                continue
            totals[(op_kinds or {}).get(name) or op_kind(name)] += float(e["dur"])
    total = sum(totals.values())
    if not total:
        return {"source": source, "error": "the trace has no per-op events (on CPU they need a module "
                "compiled with xla_cpu_enable_xprof_traceme, as --what=trace does)"}
    return {
        "source": source,
        "total_us": total,
        "by_kind_us": dict(totals),
        "by_kind_share": {k: (v / total if total else 0.0) for k, v in totals.items()},
    }


def run_trace(config, steps, state_abstract, batch_abstract, out_dir: str, n_steps: int) -> dict:
    """Runs 2 warm-up steps and ``n_steps`` traced steps on random tokens; times them; MFU."""
    rng = np.random.default_rng(0)
    shape = batch_abstract["tokens"].shape

    def batch():
        local = {
            "tokens": rng.integers(3, int(config.model.vocab_size), size=shape, dtype=np.int32),
            "loss_mask": np.ones(shape, np.float32),
            "token_bytes": np.full(shape, 4, np.int32),
        }
        return {k: jax.device_put(v, batch_abstract[k].sharding) for k, v in local.items()}

    state = steps.init(jax.random.key(0))
    train_step, op_kinds = steps.train_step, None
    if jax.devices()[0].platform == "cpu":  # XLA:CPU records per-op events only when asked
        train_step = steps.train_step.lower(state, batch()).compile(
            compiler_options={"xla_cpu_enable_xprof_traceme": True})
        op_kinds = hlo_op_kinds(train_step.as_text())
    for _ in range(2):
        state, stats = train_step(state, batch())
    jax.block_until_ready(stats["loss"])
    batches = [batch() for _ in range(n_steps)]
    trace_dir = os.path.join(out_dir, "trace")
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for b in batches:
        with jax.profiler.StepTraceAnnotation("train", step_num=int(jax.device_get(state.step))):
            state, stats = train_step(state, b)
    jax.block_until_ready(stats["loss"])
    seconds = (time.perf_counter() - t0) / n_steps
    jax.profiler.stop_trace()
    tokens = shape[0] * shape[1]
    fpt = flops_lib.flops_per_token(config.model, training=True)
    peak = flops_lib.peak_flops_per_second(jax.devices()[0])
    peak_total = peak * steps.mesh.devices.size if peak else None
    return {
        "trace_dir": trace_dir,
        "device": jax.devices()[0].device_kind,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "analytic_flops_per_token": fpt,
        "mfu": flops_lib.mfu(fpt, tokens / seconds, peak_total),
        "ops": summarize_trace(trace_dir, op_kinds),
    }


# --------------------------------------------------------------------------- the report


def parse_what(text: str) -> list[str]:
    items = [w.strip() for w in (text or "").split(",") if w.strip()]
    out: list[str] = []
    for w in items:
        if w == "all":
            out += ["jaxpr", "hlo", "cost", "memory"]
        elif w in WHATS:
            out.append(w)
        else:
            raise UserError(f"unknown --what={w!r}; choose from {', '.join(WHATS + ('all',))}")
    if not out:
        raise UserError(f"--what is empty; choose from {', '.join(WHATS + ('all',))}")
    return list(dict.fromkeys(out))


def _fmt_bytes(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def profile(config, what: list[str], out_dir: str, mesh_text: str | None = None, n_steps: int = 5,
            echo=print) -> dict[str, Any]:
    """Runs the requested analyses; writes files under ``out_dir``; returns the report dict."""
    if "aot" in what and not mesh_text:
        raise UserError("--what=aot needs --mesh=DATAxFSDPxTENSOR, e.g. --mesh=2x2x2")
    if "aot" in what and jax.devices()[0].platform != "cpu":
        raise UserError("--what=aot runs on fake CPU devices; call it as python -m mixers_jax.profile")
    os.makedirs(out_dir, exist_ok=True)
    steps, state, batch = setup(config, mesh_text)
    mesh_shape = dict(steps.mesh.shape)
    n_dev = int(steps.mesh.devices.size)
    tokens = int(batch["tokens"].shape[0] * batch["tokens"].shape[1])
    report: dict[str, Any] = {
        "config": config.name, "model": config.model.to_dict(), "mesh": mesh_shape,
        "sharding": config.get("sharding", "3d"), "batch_size": int(config.train.batch_size),
        "jax": jax.__version__, "platform": jax.devices()[0].platform,
        "analytic_flops_per_token": flops_lib.flops_per_token(config.model, training=True),
    }
    echo(f"{config.name}: {config.model.kind}, mesh {mesh_shape}, sharding {report['sharding']}, "
         f"global batch {batch['tokens'].shape}")

    compiled = {}

    def compile_step():
        if "train" not in compiled:
            t0 = time.perf_counter()
            compiled["train"], log = compile_logged(steps.train_step, state, batch)
            report["compile_s"] = time.perf_counter() - t0
            report["involuntary_remats"] = log.involuntary_remats
            report["involuntary_remat_ops"] = log.remat_operations()
        return compiled["train"]

    def compile_forward():
        if "forward" not in compiled:
            compiled["forward"] = forward_fn(steps).lower(state.params, batch["tokens"]).compile()
        return compiled["forward"]

    if "jaxpr" in what or "cost" in what:
        jp_train, jp_fwd = train_step_jaxpr(steps, state, batch), forward_jaxpr(steps, state, batch)
        if "jaxpr" in what:
            for name, jp in (("train_step", jp_train), ("forward", jp_fwd)):
                path = os.path.join(out_dir, f"{name}.jaxpr.txt")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(str(jp))
                echo(f"wrote {path}")
    if "hlo" in what:
        for name, c in (("train_step", compile_step()), ("forward", compile_forward())):
            path = os.path.join(out_dir, f"{name}.hlo.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(c.as_text())
            echo(f"wrote {path}")
    if "cost" in what:
        cost = {}
        for name, jp, training, comp in (
            ("train_step", jp_train, True, compile_step), ("forward", jp_fwd, False, compile_forward)
        ):
            counted = count_flops(jp)
            analytic = flops_lib.flops_per_token(config.model, training=training)
            xla = xla_cost(comp())
            # XLA analyses the per-device SPMD program: ×devices for the global count.
            xla_total = xla.get("flops", float("nan")) * n_dev
            cost[name] = {
                "jaxpr_flops_per_token": counted["total"] / tokens,
                "analytic_flops_per_token": analytic,
                "xla_flops_per_token": xla_total / tokens,
                "jaxpr_by_primitive": counted["by_primitive"],
                "jaxpr_ops": [dict(primitive=p, shapes=s, dtype=dt, count=c, flops=f)
                              for p, s, dt, c, f in counted["ops"]],
            }
            echo(f"{name}: FLOPs/token  jaxpr {counted['total'] / tokens:.4g} | analytic "
                 f"{analytic:.4g} (ratio {analytic / (counted['total'] / tokens):.4f}) | XLA "
                 f"{xla_total / tokens:.4g}")
            for p, s, dt, c, f in counted["ops"][:12]:
                echo(f"    {p:<21} {s:<40} {dt:<9} x{c:<4} {f / tokens:.4g}/token")
        report["cost"] = cost
    if "memory" in what or "aot" in what:
        mem = memory_report(compile_step())
        sb = state_bytes_per_device(state)
        report["memory_per_device"] = dict(mem, params_bytes=sb["params"], opt_state_bytes=sb["opt_state"])
        ops = report["involuntary_remat_ops"]
        echo(f"SPMD partitioner: {remats_text(report['involuntary_remats'])} involuntary full "
             f"rematerializations" + (f" ({', '.join(ops)})" if ops else ""))
        echo(f"per device: params {_fmt_bytes(sb['params'])} | optimizer {_fmt_bytes(sb['opt_state'])} | "
             f"arguments {_fmt_bytes(mem['argument_size_in_bytes'])} | outputs "
             f"{_fmt_bytes(mem['output_size_in_bytes'])} | temporaries (activations, workspace) "
             f"{_fmt_bytes(mem['temp_size_in_bytes'])} | compile {report['compile_s']:.1f}s")
    if "aot" in what:
        m = report["memory_per_device"]
        total = sum(m[k] or 0 for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "temp_size_in_bytes")) - (m["alias_size_in_bytes"] or 0)
        m["total_bytes"] = total
        shape = "x".join(str(v) for v in mesh_shape.values())
        echo("AOT row: | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.3g} | {:.0f} s |".format(
            config.name, config.model.kind, shape, config.train.get("remat", "none"),
            _fmt_bytes(m["params_bytes"]), _fmt_bytes(m["opt_state_bytes"]),
            _fmt_bytes(m["temp_size_in_bytes"]), _fmt_bytes(total),
            remats_text(report["involuntary_remats"]), report["analytic_flops_per_token"],
            report["compile_s"]))
    if "trace" in what:
        report["trace"] = run_trace(config, steps, state, batch, out_dir, n_steps)
        t = report["trace"]
        mfu = "n/a (unknown peak)" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
        echo(f"trace: {t['step_s'] * 1e3:.1f} ms/step, {t['tokens_per_s']:,.0f} tokens/s, MFU {mfu}; "
             f"view with: tensorboard --logdir={t['trace_dir']}")
        if "error" in t["ops"]:
            echo(f"    time by op kind: {t['ops']['error']}")
        for k, share in sorted(t["ops"].get("by_kind_share", {}).items(), key=lambda kv: -kv[1]):
            echo(f"    {k:<16} {100 * share:5.1f}%")
    path = os.path.join(out_dir, "profile.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    echo(f"wrote {path}")
    return report
