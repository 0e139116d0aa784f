"""The machine and the library versions a measurement ran on (recorded with benchmark and
evaluation results, so that figures from different machines are not compared by mistake)."""
from __future__ import annotations

import os
import platform
import time

import flax
import jax
import jaxlib
import numpy as np
import optax

import mixers_jax


def environment() -> dict:
    """Device (platform:kind) and count, CPU count, Python and library versions, local time."""
    dev = jax.devices()[0]
    return {
        "device": f"{dev.platform}:{dev.device_kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "numpy": np.__version__,
        "mixers_jax": mixers_jax.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
