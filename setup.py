"""mixers_jax: masked mixers, mixer autoencoders and memory models in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="mixers_jax",
    version="0.1.0",
    description="Masked-mixer language models and the research built on them, in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["mixers_jax", "mixers_jax.*"]),
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",  # Hugging Face tokenizer.json (mixers_jax/data/tokenizer_json.py)
        "safetensors>=0.4",  # Hugging Face checkpoints (mixers_jax/hf_llama.py)
        "ml_collections>=1.0",
        "tensorboardX>=2.6",
        "absl-py>=2.1",
        "numpy>=1.26",
        "pyarrow>=14",
        "matplotlib>=3.7",  # mixers_jax.inspect heatmaps, mixers_jax.plot curves
        "bm25s>=0.2",  # the BM25 baseline of the retrieval evaluation (mixers_jax/ranking.py)
    ],
    extras_require={"test": ["pytest>=8", "pytest-xdist>=3"]},
)
