"""Autotuning: search spaces declared beside the kernels they tune, a tuner with a time
budget, and a persistent tuning database shared by every target.

    @space(BLOCK_M=[32, 64, 128], BLOCK_N=[32, 64], num_warps=[4, 8])
    def gemm_kernel(...): ...

    best = tune(TuningKey("triton.gemm", sig, target.key()), gemm_kernel.tune_space, measure,
                budget=Budget.parse("fast"))
"""
from .db import TuningDB, TuningKey, default_db
from .space import Space, space
from .tuner import Budget, TuneResult, tune

__all__ = ["Space", "space", "TuningDB", "TuningKey", "default_db", "Budget", "TuneResult", "tune"]
