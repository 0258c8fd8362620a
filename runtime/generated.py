"""A kernel group as one generated kernel: tune its schedule, build (or load) it, wrap it.

Tuning (``kiln.codegen.autotune``) measures schedule configurations on the group's real
shapes and keeps winners in the tuning database; a configuration whose outputs disagree
with the reference never wins. The winner is compiled and exported into the module cache
(``runtime.module_cache``) and wrapped as a plan kernel (``codegen.tvm_runtime``).
Whether the generated kernel then replaces the group's per-node kernels is
``kiln.kernels.choice.choose_group``'s decision.
"""
from __future__ import annotations

import math

import torch

from kiln.codegen.tvm_runtime import GeneratedKernel
from kiln.kernels.choice import agrees, as_output_list, group_inputs, reference_outputs
from kiln.kernels.timing import best_seconds

from .module_cache import build_in_memory, compiled

KERNEL_PREFIX = "tvm.group."
TUNING_ROUNDS = 5


def generated_kernel(group, graph, target, threads: int, tune="fast", db=None, sizes: dict | None = None) \
        -> GeneratedKernel:
    """Tune (or take the tuning database's winner), compile (or load from the cache) and wrap.
    A group of symbolic shapes compiles to one kernel taking any size; its configuration is
    tuned at ``sizes`` (the representative sizes)."""
    from kiln.codegen.autotune import TuningKey, tune as run_tuner
    from kiln.codegen.schedules_cpu import tune_space
    from kiln.codegen.tvm import CODEGEN_VERSION, signature, signature_hash

    sig = signature(group)
    # the schedule template's version is part of the key: a config tuned for an older
    # template (what its knobs meant then) is not reused
    at = "" if sizes is None else f"\nsizes={sorted(sizes.items())}"
    key = TuningKey(f"tvm.group.v{CODEGEN_VERSION}", f"{sig}\nthreads={threads}{at}", target.key())
    space = tune_space(group, threads)
    ins = ref = None

    def measure(cfg: dict) -> float:
        nonlocal ins, ref
        if ins is None:
            ins = group_inputs(group, graph, sizes)
            with torch.no_grad():
                ref = reference_outputs(group, ins, sizes)
        k = GeneratedKernel(build_in_memory(group, cfg, target, threads), group, "", cfg, True, threads=threads)
        if not agrees(tuple(as_output_list(k(ins))), tuple(ref)):
            return math.inf  # wrong numbers never win
        return best_seconds([lambda: k(ins)], TUNING_ROUNDS, warmup=1)[0]

    result = run_tuner(key, space, measure, tune, db=db)
    fn, built = compiled(group, result.config, target, threads)
    return GeneratedKernel(fn, group, KERNEL_PREFIX + signature_hash(group), result.config, built, result, threads)
