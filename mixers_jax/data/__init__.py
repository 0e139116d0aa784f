"""Data: sources (files, JSONL, Parquet, the embedded corpus), the tokenizer and the grain pipeline.

Names are imported lazily, so ``mixers_jax.data.sources`` can be used without importing grain.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_documents": "sources",
    "embedded_corpus": "embedded",
    "split_documents": "sources",
    "split_first": "sources",
    "split_for_config": "sources",
    "chunk_text": "chunking",
    "Tokenizer": "tokenizer",
    "tokenize_documents": "pipeline",
    "count_windows": "pipeline",
    "pack_rows": "pipeline",
    "pad_rows": "pipeline",
    "finish_batch": "pipeline",
    "make_train_iterator": "pipeline",
    "make_eval_batches": "pipeline",
    "get_iterator_state": "pipeline",
    "set_iterator_state": "pipeline",
    "build_data": "pipeline",
    "DataBundle": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
