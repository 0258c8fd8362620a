"""Graph rewrites and the pass pipeline (see passes/pipeline.py)."""
