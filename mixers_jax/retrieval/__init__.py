"""Retrieval tools over trained LMs (docs/retrieval.md): embedding texts with a trained run."""
