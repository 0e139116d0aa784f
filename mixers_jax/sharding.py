"""Meshes, logical-axis rules and shardings. The only module that touches ``jax.sharding``.

Parameters carry logical axis names (``nn.with_logical_partitioning``); this module maps them to the
physical mesh axes ``('data', 'fsdp', 'tensor')``:

* batch           -> ('data', 'fsdp')   activations and data are split over both
* embed           -> 'fsdp'             FSDP: parameters and optimizer state split on the width
* mlp, heads      -> 'tensor'           tensor parallel channel MLP and headed mixing
* vocab           -> 'tensor'
* seq_out, seq_in -> replicated          the n x n token-mixing matrices stay whole

A dimension that a mesh axis does not divide is replicated instead of failing, so one rule set
serves every model size; the n x n mixing matrices are replicated or split by head.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mixers_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("seq_out", None),
    ("seq_in", None),
    ("norm", None),
    ("layers", None),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)


# --------------------------------------------------------------------------- presets
#
# A preset is a mesh-shape template plus logical rules. ``None`` in a template takes the size from
# ``config.mesh`` (the tensor-parallel degree); -1 takes the remaining devices.

_REPLICATED_PARAMS = tuple(
    (name, None) for name in ("embed", "mlp", "heads", "vocab", "head_dim", "seq_out", "seq_in", "norm",
                              "layers")
)
_ACTS_REPLICATED = (("length", None), ("act_embed", None), ("act_mlp", None), ("act_heads", None))


def _rules(**overrides) -> tuple[tuple[str, Any], ...]:
    base = dict((("batch", BATCH_AXES),) + _REPLICATED_PARAMS + _ACTS_REPLICATED)
    base.update(overrides)
    return tuple(base.items())


DP_RULES = _rules()
FSDP_RULES = _rules(embed="fsdp")
TP_RULES = _rules(mlp="tensor", heads="tensor", vocab="tensor", act_mlp="tensor", act_heads="tensor")

PRESETS: dict[str, dict[str, Any]] = {
    # name: (mesh template, rules, one-line description)
    "3d": dict(mesh=None, rules=DEFAULT_RULES,
               doc="all rules (FSDP on 'fsdp', TP on 'tensor', batch on 'data'+'fsdp'); sizes from config.mesh"),
    "dp": dict(mesh=dict(data=-1, fsdp=1, tensor=1), rules=DP_RULES,
               doc="data parallel: parameters and optimizer state replicated, batch split over all devices"),
    "fsdp": dict(mesh=dict(data=1, fsdp=-1, tensor=1), rules=FSDP_RULES,
                 doc="fully sharded data parallel: batch and the 'embed' width of every matrix split"),
    "tp": dict(mesh=dict(data=-1, fsdp=1, tensor=None), rules=TP_RULES,
               doc="tensor parallel channel MLP, heads and vocab over config.mesh.tensor; data over the rest"),
    "fsdp_tp": dict(mesh=dict(data=1, fsdp=-1, tensor=None), rules=DEFAULT_RULES,
                    doc="FSDP over the rest, tensor parallel over config.mesh.tensor"),
}


def resolve(config) -> tuple[dict[str, int], tuple]:
    """``(mesh sizes, logical rules)`` for ``config.sharding`` (a preset name) and ``config.mesh``."""
    name = config.get("sharding", "3d") if hasattr(config, "get") else "3d"
    if name not in PRESETS:
        raise UserError(f"unknown sharding preset {name!r}; choose one of: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    user = {a: int(config.mesh[a]) for a in MESH_AXES}
    if preset["mesh"] is None:
        return user, preset["rules"]
    mesh = {a: (user[a] if v is None else v) for a, v in preset["mesh"].items()}
    if name in ("tp", "fsdp_tp") and mesh["tensor"] == -1:
        raise UserError(f"sharding={name!r} needs a fixed config.mesh.tensor (the tensor-parallel degree)")
    return mesh, preset["rules"]


def parse_mesh(text: str) -> dict[str, int]:
    """'2x2x2' (data x fsdp x tensor) -> {'data': 2, 'fsdp': 2, 'tensor': 2}."""
    try:
        sizes = [int(p) for p in text.lower().split("x")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or any(s < 1 for s in sizes):
        raise UserError(f"--mesh must look like DATAxFSDPxTENSOR, e.g. 2x2x2; got {text!r}")
    return dict(zip(MESH_AXES, sizes))


def activation_rules(rules, mesh: Mesh, dims: dict[str, int]) -> tuple:
    """``rules`` with activation axes whose size ``dims[name]`` the mesh does not divide replicated."""
    out = []
    for logical, physical in rules:
        size = dims.get(logical)
        if size is not None and physical is not None:
            axes = (physical,) if isinstance(physical, str) else tuple(physical)
            if size % int(np.prod([mesh.shape[a] for a in axes])):
                physical = None
        out.append((logical, physical))
    return tuple(out)


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules):
    """Makes the models' ``nn.with_logical_constraint`` calls real constraints on ``mesh``."""
    with nn.logical_axis_rules(rules), _use_mesh(mesh):
        yield


def _use_mesh(mesh: Mesh):
    # Inside jit only the abstract mesh may be set; flax's constraints look it up.
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


# --------------------------------------------------------------------------- multi-host


def detect_multiprocess(env=None) -> str | None:
    """The launcher that started several processes (SLURM, TPU pod, Open MPI), or None."""
    env = os.environ if env is None else env
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_STEP_ID" in env:
        return "slurm"
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> None:
    """``jax.distributed.initialize`` before anything touches devices.

    With no arguments JAX detects TPU pods, SLURM and Open MPI itself. On CPU the cross-process
    collectives go through gloo.
    """
    try:  # only affects the CPU backend; needed there for cross-process collectives
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError, KeyError):  # option renamed, or gloo already the default
        pass
    kwargs = {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address or None,
            num_processes=num_processes,
            process_id=process_id,
            **kwargs,
        )
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"jax.distributed.initialize failed: {first}") from None


def mesh_shape(mesh_cfg, device_count: int) -> tuple[int, int, int]:
    """Resolves the configured ('data', 'fsdp', 'tensor') sizes; one -1 takes the rest."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % fixed:
            raise UserError(f"mesh: {device_count} devices do not divide by the fixed axes ({fixed})")
        sizes[sizes.index(-1)] = device_count // fixed
    if int(np.prod(sizes)) != device_count:
        raise UserError(
            f"mesh: {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
            f"but {device_count} are available"
        )
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh over ``devices`` (default: all); one device is 1x1x1."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _mesh_axes_for(name: str | None, rules) -> tuple[str, ...]:
    if name is None:
        return ()
    for logical, physical in rules:
        if logical == name:
            if physical is None:
                return ()
            return (physical,) if isinstance(physical, str) else tuple(physical)
    raise ValueError(f"no sharding rule for logical axis {name!r}")


def spec_for(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh, rules=DEFAULT_RULES):
    """Physical PartitionSpec for an array of ``shape`` with logical axis names ``logical``.

    Mesh axes that do not divide a dimension, or that an earlier dimension already uses, are dropped.
    """
    used: set[str] = set()
    out = []
    for dim, name in zip(shape, logical):
        axes = tuple(a for a in _mesh_axes_for(name, rules) if a not in used)
        while axes and dim % int(np.prod([mesh.shape[a] for a in axes])):
            axes = axes[:-1]
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def tree_shardings(abstract_boxed: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
    """NamedShardings for an (abstract) tree whose leaves may be logically partitioned boxes.

    Returns a tree with the structure of ``nn.meta.unbox(abstract_boxed)``.
    """

    def leaf_sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, spec_for(value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(
        leaf_sharding, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch rows split over ('data', 'fsdp'); every other dimension whole."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_divisor(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def bytes_per_device(tree: Any) -> dict[str, int]:
    """Bytes of ``tree`` resident on each device (for checking FSDP)."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.nbytes
    return out
