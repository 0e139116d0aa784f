"""One process of the two-process test (tests/test_multihost.py); prints the losses as JSON.

    python tests/multihost_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID STEPS

NUM_PROCESSES=1 runs without jax.distributed (the single-process reference). Every process builds
the same global batches from a fixed seed and feeds only the rows its own devices hold, exactly as
the data pipeline's per-process slices are fed in training.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

coordinator, num_processes, process_id, n_steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

from mixers_jax import sharding  # noqa: E402

if num_processes > 1:
    sharding.initialize_distributed(coordinator, num_processes, process_id)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mixers_jax import trainer  # noqa: E402
from mixers_jax.config import load_config  # noqa: E402
from tests_util import config_path  # noqa: E402

config = load_config(config_path("mixer_clm", "smoke"))
mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
steps = trainer.build_steps(config, mesh)
state = steps.init(jax.random.key(0))

rows, n, vocab = config.train.batch_size, config.model.n_ctx, config.model.vocab_size
per_process = rows // jax.process_count()
lo = jax.process_index() * per_process
losses = []
for s in range(n_steps):
    rng = np.random.default_rng(s)
    tokens = rng.integers(3, vocab, size=(rows, n), dtype=np.int32)
    mask = (rng.random((rows, n)) > 0.2).astype(np.float32)
    full = {"tokens": tokens, "loss_mask": mask, "token_bytes": np.full((rows, n), 2, np.int32)}
    local = {k: v[lo : lo + per_process] for k, v in full.items()}
    state, stats = steps.train_step(state, sharding.global_batch(local, mesh))
    losses.append(float(stats["loss"]))
print("RESULT " + json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                              "devices": jax.device_count(), "losses": losses}), flush=True)
