"""One process of the two-process test (tests/test_multihost.py); prints the losses as JSON.

    python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID STEPS

``losses(n_steps, devices)`` is also the single-process reference (the test calls it in-process).
Every process builds the same global batches from a fixed seed and feeds only the rows its own
devices hold, exactly as the data pipeline's per-process slices are fed in training.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def losses(n_steps, devices=None):
    """Trains the smoke mixer ``n_steps`` on fixed global batches; each process feeds its rows."""
    import jax
    import numpy as np

    from mixers_jax import sharding
    from mixers_jax import steps as steps_lib
    from mixers_jax.config import load_config
    from tests_util import config_path

    config = load_config(config_path("mixer_clm", "smoke"))
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
    steps = steps_lib.build_steps(config, mesh)
    state = steps.init(jax.random.key(0))
    rows, n, vocab = config.train.batch_size, config.model.n_ctx, config.model.vocab_size
    per_process = rows // jax.process_count()
    lo = jax.process_index() * per_process
    out = []
    for s in range(n_steps):
        rng = np.random.default_rng(s)
        tokens = rng.integers(3, vocab, size=(rows, n), dtype=np.int32)
        mask = (rng.random((rows, n)) > 0.2).astype(np.float32)
        full = {"tokens": tokens, "loss_mask": mask, "token_bytes": np.full((rows, n), 2, np.int32)}
        local = {k: v[lo : lo + per_process] for k, v in full.items()}
        state, stats = steps.train_step(state, sharding.global_batch(local, mesh))
        out.append(float(stats["loss"]))
    return out


if __name__ == "__main__":
    coordinator, num_processes, process_id = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    n_steps = int(sys.argv[4])
    from mixers_jax import sharding

    if num_processes > 1:
        sharding.initialize_distributed(coordinator, num_processes, process_id)
    import jax

    result = losses(n_steps)
    print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                                  "devices": jax.device_count(), "losses": result}), flush=True)
