"""Loading a trained run from its workdir (for generate, compress, inspect).

A workdir written by ``trainer.run`` holds ``config.json``, ``tokenizer.model`` and
``checkpoints/<step>/`` (orbax items state/data/meta; the state is ``trainer.TrainState``).
:func:`load_run` rebuilds the model from the config and restores the latest checkpoint's params onto
one device (whatever mesh the run trained on).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mixers_jax.errors import UserError


@dataclasses.dataclass
class Run:
    workdir: str
    config: ml_collections.ConfigDict
    model: Any
    params: Any
    tokenizer: Any
    step: int

    def fingerprint(self) -> bytes:
        """16-byte hash of the params (names, shapes, dtypes, values), the tokenizer model and the
        model config: the identity of what drives generation and compression."""
        return fingerprint(self.params, self.tokenizer.serialized(), self.config.model.to_dict())


def fingerprint(params: Any, tokenizer_proto: bytes, model_cfg: dict) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model_cfg, sort_keys=True).encode())
    h.update(hashlib.sha256(tokenizer_proto).digest())
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])
    ):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.digest()


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{workdir} is not a training workdir (no config.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    return with_defaults(saved)


def with_defaults(saved: dict) -> ml_collections.ConfigDict:
    """A saved config with every field added to the schema since then at its default value (a
    workdir from an older version still loads)."""
    from mixers_jax.config import base_config

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


def load_run(workdir: str, step: int | None = None) -> Run:
    """(config, model, params, tokenizer) of the latest (or given) checkpoint in ``workdir``."""
    import flax.linen as nn
    import jax.numpy as jnp

    from mixers_jax import checkpoint as ckpt_lib
    from mixers_jax import trainer
    from mixers_jax.data.tokenizer import Tokenizer
    from mixers_jax.models import build_model, input_length

    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} does not exist")
    config = load_config(workdir)
    tok_path = os.path.join(workdir, "tokenizer.model")
    if not os.path.exists(tok_path):
        raise UserError(f"{workdir} has no tokenizer.model")
    tokenizer = Tokenizer.load(tok_path)
    model = build_model(config.model)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{workdir} has no checkpoints/")
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=10**6)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise UserError(f"{workdir} has no checkpoint yet")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"{workdir} has no checkpoint at step {step} (has {sorted(steps)})")
        # The optimizer state's structure is that of the stage that wrote the checkpoint.
        stage = trainer.stage_at(trainer.stages(config), step)
        n_in = input_length(config.model)

        def init_params(rng):
            return model.init(rng, jnp.zeros((1, n_in), jnp.int32))["params"]

        labels = trainer.param_labels(nn.meta.unbox(jax.eval_shape(init_params, jax.random.key(0))),
                                      stage.train)
        tx = trainer.make_optimizer(stage.train, stage.start, labels)

        def init(rng):
            params = init_params(rng)
            return trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

        abstract = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
        )
        try:
            state, _, _ = checkpointer.restore(step, abstract)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot restore {ckpt_dir}/{step}: {first}") from None
    finally:
        checkpointer.close()
    return Run(workdir, config, model, state.params, tokenizer, int(step))
