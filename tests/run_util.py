"""A tiny trained-looking workdir (random params) for generate / compress / inspect tests."""
import json
import os

import jax
import jax.numpy as jnp

TEXT_MODULES = ("json", "os", "re", "collections", "argparse", "pathlib", "functools", "typing")


def sample_text() -> str:
    import importlib

    return "\n\n".join(importlib.import_module(m).__doc__ or "" for m in TEXT_MODULES)


def make_workdir(path: str, seed: int = 0, params_map=None, **model_overrides) -> str:
    """config.json + tokenizer.model + checkpoints/1 with randomly initialised params
    (``params_map(leaf)`` applied to each parameter when given)."""
    import flax.linen as nn

    from mixers_jax import checkpoint as ckpt_lib
    from mixers_jax import steps as steps_lib
    from mixers_jax import workdir as workdir_lib
    from mixers_jax.config import base_config, input_length
    from mixers_jax.data.tokenizer import Tokenizer
    from mixers_jax.models import build_model

    config = base_config()
    config.model.update(dict(vocab_size=400, n_ctx=16, d_model=32, n_layers=2, n_heads=2))
    config.model.update(model_overrides)
    os.makedirs(path, exist_ok=True)
    tok = Tokenizer.train([sample_text()], config.model.vocab_size,
                          os.path.join(path, workdir_lib.TOKENIZER_FILE))
    model = build_model(config.model)
    params = nn.meta.unbox(
        model.init(jax.random.key(seed), jnp.zeros((1, input_length(config.model)), jnp.int32))["params"])
    if params_map is not None:
        params = jax.tree.map(params_map, params)
    tx = steps_lib.make_optimizer(config.train)
    state = steps_lib.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    with open(os.path.join(path, workdir_lib.CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f)
    ck = ckpt_lib.Checkpointer(os.path.join(path, workdir_lib.CHECKPOINTS_DIR))
    ck.save(1, state, {}, {"tokenizer": ckpt_lib.encode_bytes(tok.serialized())})
    ck.close()
    return path
