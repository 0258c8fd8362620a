"""Offline batch inference with a saved Kiln artifact over Ray Data.

    ds = ray.data.from_numpy(images)                      # or read_parquet, read_images, ...
    out = kiln.ray.map_batches(ds, "model.kiln", batch_size=64, concurrency=2)

An actor pool of ``concurrency`` actors, each loading the artifact once in its constructor;
every NumPy batch runs through ``kiln.batching.Batcher`` (cut and padded to the batch
sizes the artifact was saved with, so any ``batch_size`` works). The model's inputs are the
dataset's columns (``columns=``, default: all of them in schema order); its outputs become
the columns ``output`` (one output) or ``output_0``, ``output_1``, ...; other columns pass
through unchanged (the input columns too, with ``keep_inputs=True``).

This module imports Ray (the real one: absolute imports); ``import kiln`` never does.
"""
from __future__ import annotations

import os

import numpy as np

from kiln.errors import KilnError


class KilnPredictor:
    """A Ray Data callable class: loads the artifact once per actor, maps batches."""

    def __init__(self, artifact: str, columns=None, keep_inputs: bool = False, threads: int = 1):
        import torch

        from kiln.options import configure_tvm_environment

        configure_tvm_environment(threads)
        torch.set_num_threads(threads)
        self.batcher = self.make_batcher(artifact)
        self.columns, self.keep_inputs = columns, keep_inputs

    def make_batcher(self, artifact: str):
        """The loaded artifact in a Batcher (overridden by the benchmark's eager baseline)."""
        from kiln.artifact import load
        from kiln.batching import Batcher

        return Batcher(load(artifact))

    def __call__(self, batch: dict) -> dict:
        cols = list(self.columns) if self.columns else list(batch)
        missing = [c for c in cols if c not in batch]
        if missing:
            raise KilnError(f"columns {missing} are not in the batch (it has {list(batch)})")
        inputs = self.batcher.check([np.asarray(batch[c]) for c in cols])
        (result,) = self.batcher.run([inputs])
        if isinstance(result, Exception):
            raise result
        out = {k: v for k, v in batch.items() if self.keep_inputs or k not in cols}
        if len(result) == 1:
            out["output"] = result[0]
        else:
            out.update({f"output_{i}": r for i, r in enumerate(result)})
        return out


def map_batches(dataset, artifact, *, batch_size: int = 32, concurrency: int = 1, threads: int = 1,
                columns=None, keep_inputs: bool = False, predictor=KilnPredictor, predictor_kwargs=None,
                **ray_options):
    """``dataset`` with the model's outputs: a lazy ``ray.data.Dataset`` (nothing runs until
    it is consumed). ``concurrency`` actors, each with ``threads`` threads and as many CPUs
    reserved from Ray; other keywords go to ``Dataset.map_batches``. ``predictor``: the
    actor class, a ``KilnPredictor`` subclass (with ``predictor_kwargs`` for its constructor)."""
    from kiln.artifact import info

    path = os.path.abspath(os.fspath(artifact))
    info(path)  # a missing or foreign file fails here, not inside the pool
    if not isinstance(batch_size, int) or batch_size < 1:
        raise KilnError(f"batch_size must be a positive int, got {batch_size!r}")
    ray_options.setdefault("num_cpus", threads)
    return dataset.map_batches(predictor, batch_size=batch_size, concurrency=concurrency,
                               batch_format="numpy", fn_constructor_args=(path,),
                               fn_constructor_kwargs={"columns": columns, "keep_inputs": keep_inputs,
                                                      "threads": threads, **(predictor_kwargs or {})},
                               **ray_options)
