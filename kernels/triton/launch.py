"""One way to launch a Triton kernel, so every launch can also be recorded and built ahead.

Library wrappers and generated kernels call ``launch(kernel, grid, args, constexprs)``.
Normally that launches (on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1``). Inside
``recording()`` it records the launch instead: the wrappers then run on ``meta`` tensors
(shapes and dtypes, no data), which is how a CUDA plan learns, on a machine without a GPU,
exactly which kernel specializations it will launch, so they can be compiled to cubin for
the target SM ahead of time (``compile_ahead``).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import field

import torch

from kiln.ir.record import record

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}


@record(slots=False)
class LaunchRecord:
    """One kernel specialization: what triton.compile needs to build it ahead of time."""

    kernel: object  # a triton JITFunction
    signature: tuple[tuple[str, str], ...]  # (argument name, triton type) incl. constexprs
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)


@record(frozen=False, slots=False)
class _Recorder:
    records: list[LaunchRecord] = field(default_factory=list)


_state = threading.local()


def arg_type(x) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i32" if -(2**31) <= x < 2**31 else "i64"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"cannot pass {type(x).__name__} to a Triton kernel")


def launch(kernel, grid: tuple, args: tuple, constexprs: dict, num_warps: int = 4, num_stages: int = 2) -> None:
    rec: _Recorder | None = getattr(_state, "recorder", None)
    if rec is not None:
        names = kernel.arg_names
        sig = [(n, arg_type(a)) for n, a in zip(names, args)]
        sig += [(n, "constexpr") for n in names[len(args):]]
        rec.records.append(LaunchRecord(kernel, tuple(sig), tuple(sorted(constexprs.items())), num_warps,
                                        num_stages))
        return
    if any(g <= 0 for g in grid):
        return  # an empty tensor: nothing to do
    if interpreting():
        kernel[grid](*args, **constexprs)  # the interpreter ignores warps and stages
    else:
        kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    from triton import knobs

    return bool(knobs.runtime.interpret)


@contextlib.contextmanager
def recording():
    """Record launches instead of running them (use with meta tensors)."""
    prev = getattr(_state, "recorder", None)
    rec = _Recorder()
    _state.recorder = rec
    try:
        yield rec.records
    finally:
        _state.recorder = prev


def is_recording() -> bool:
    return getattr(_state, "recorder", None) is not None


def dedupe(records) -> list[LaunchRecord]:
    seen, out = set(), []
    for r in records:
        k = (id(r.kernel), r.signature, r.constexprs, r.num_warps, r.num_stages)
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


@record(frozen=False, slots=False)
class Built:
    record: LaunchRecord
    sm: int
    cubin_bytes: int = 0
    error: str = ""


def compile_ahead(record: LaunchRecord, sm: int) -> Built:
    """Compile one recorded specialization to cubin for ``sm`` (Triton's bundled ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        src = ASTSource(fn=record.kernel, signature=dict(record.signature), constexprs=dict(record.constexprs))
        k = triton.compile(src, target=GPUTarget("cuda", sm, 32),
                           options={"num_warps": record.num_warps, "num_stages": record.num_stages})
        return Built(record, sm, len(k.asm["cubin"]))
    except Exception as e:  # noqa: BLE001  (reported per kernel, never hidden)
        return Built(record, sm, 0, f"{type(e).__name__}: {str(e).strip()[:400]}")


_POOL_WORK: list = []


def _compile_index(i: int) -> tuple[int, str]:
    rec, sm = _POOL_WORK[i]
    b = compile_ahead(rec, sm)
    return b.cubin_bytes, b.error


def compile_many(records: list[LaunchRecord], sms, jobs: int | None = None) -> dict[int, list[Built]]:
    """Compile every record for every SM; with ``jobs`` > 1 in forked worker processes
    (the records' kernels are inherited, not pickled)."""
    import multiprocessing
    import os

    from kiln.options import settings

    work = [(r, sm) for sm in sms for r in records]
    if jobs is None:
        jobs = settings().build_jobs or min(4, len(os.sched_getaffinity(0)))
    results: list[tuple[int, str]]
    if jobs > 1 and len(work) > 1 and "fork" in multiprocessing.get_all_start_methods():
        global _POOL_WORK
        _POOL_WORK = work
        try:
            with multiprocessing.get_context("fork").Pool(min(jobs, len(work))) as pool:
                results = pool.map(_compile_index, range(len(work)), chunksize=1)
        finally:
            _POOL_WORK = []
    else:
        results = [(b.cubin_bytes, b.error) for b in (compile_ahead(r, sm) for r, sm in work)]
    out: dict[int, list[Built]] = {sm: [] for sm in sms}
    for (r, sm), (nbytes, err) in zip(work, results):
        out[sm].append(Built(r, sm, nbytes, err))
    return out
