"""Test setup, before JAX is imported anywhere: 8 fake CPU devices compiled at a low optimisation
level, no implicit rank promotion, and one XLA compilation cache shared by the whole test session.

The cache folder is made once per session (by the first process that imports this file; pytest-xdist
workers and the subprocesses the tests start inherit it through the environment) and removed at its
end. Identical computations (the same model compiled by several tests, by a killed and a resumed
run, or by a CLI subprocess) then compile once; a cache hit runs the very executable a fresh compile
would have produced, so no test checks less.
"""
import atexit
import os
import shutil
import tempfile

# LLVM optimisation level 0 and none of LLVM's expensive passes for the CPU code: the suite is
# compile-bound (tiny models, few steps); the first cuts XLA's compile time by about a third, the
# second the suite's time by about a tenth more, while the learning tests run no slower. The tests
# compare computations compiled the same way, or within tolerances far above any rounding
# difference the optimisation level could make.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    + " --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"  # also in the subprocesses the tests start

_CACHE_ENV = "MIXERS_JAX_TEST_COMPILATION_CACHE"
if not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="mixers_jax_xla_cache_")
    atexit.register(shutil.rmtree, os.environ[_CACHE_ENV], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
