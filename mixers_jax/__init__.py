"""mixers_jax: masked mixers and the research built on them, in JAX/Flax (Linen)."""

__version__ = "0.1.0"
