"""How a cuda plan runs, and what is built for it ahead of time.

``CudaRunner`` is the cuda plan's run strategy around the plan's one generated function
(``runtime.plan``): it checks that the inputs are somewhere the kernels can run, loads the
CUDA C kernels on first use, passes the constants as copies on the inputs' device (made
once per device), sets the tuning budget Triton kernels tune within, and after the first
calls (which tune and JIT-compile) captures the whole plan as one CUDA graph and replays it.

``build_ahead`` compiles every kernel of a plan to cubin without a GPU: the plan is replayed
on meta tensors with Triton launches recorded (``record_launches``), and each distinct
Triton specialization and CUDA C kernel is compiled for the target SM.
"""
from __future__ import annotations

import time
from dataclasses import field

import torch

from kiln.errors import KilnError
from kiln.options import settings
from kiln.ir.record import record

from .cuda_steps import TORCH_PREFIX, empty_like_value
from .plan import Plan

CAPTURE_AFTER = 3  # calls run step by step first: they tune and JIT-compile, which a capture cannot hold


@record(frozen=False, slots=False)
class AheadReport:
    """What ``build_ahead`` compiled: per SM, the Triton and CUDA C kernels and failures."""

    sms: tuple[int, ...]
    triton: dict[int, list] = field(default_factory=dict)  # sm -> [launch.Built]
    cuda: dict[int, list[str]] = field(default_factory=dict)  # sm -> kernel names in the cubin
    cuda_errors: dict[int, str] = field(default_factory=dict)
    cubins: dict[int, bytes] = field(default_factory=dict)
    seconds: float = 0.0

    def counts(self, sm: int) -> dict[str, int]:
        t = self.triton.get(sm, [])
        return {"triton": len(t), "triton_failed": sum(1 for b in t if b.error),
                "cuda_c": len(self.cuda.get(sm, [])), "cuda_c_failed": int(sm in self.cuda_errors)}

    @property
    def failures(self) -> list[str]:
        out = [f"sm_{b.sm} {b.record.name}: {b.error}" for bs in self.triton.values() for b in bs if b.error]
        return out + [f"sm_{sm} nvcc: {e}" for sm, e in self.cuda_errors.items()]


class CudaRunner:
    """The cuda strategy of ``Plan.run``: one per plan (it holds the plan's CUDA graph)."""

    def __init__(self, generated: list, tune="fast"):
        self.generated = generated  # cuda_steps.GpuGroupKernel, one per distinct kernel
        self.tune = tune  # the budget Triton kernels tune within on the device
        self.ahead: AheadReport | None = None  # set when the kernels were built without a GPU
        self.graphs = settings().cuda_graphs  # KILN_CUDA_GRAPHS=0: kernel by kernel
        self._consts: dict[str, dict] = {}  # device -> slot -> constant there
        self._graph = None  # a captured torch.cuda.CUDAGraph, False when capture failed
        self._graph_sig: list = []
        self._static_in: list = []
        self._static_out: list = []
        self._runs = 0

    def run(self, plan: Plan, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        from kiln.kernels.triton.tuning import tuning_budget

        dev = self.ensure_runnable(plan, inputs)
        with tuning_budget(self.tune):
            if dev.type != "cuda" or not self.graphs or self._graph is False:
                return plan.forward(inputs, self.consts_on(plan, dev))
            self._runs += 1
            if self._graph is None:
                if self._runs < CAPTURE_AFTER:
                    return plan.forward(inputs, self.consts_on(plan, dev))
                self._capture(plan, inputs, dev)
                if self._graph is False:
                    return plan.forward(inputs, self.consts_on(plan, dev))
            if [(tuple(x.shape), x.stride(), x.dtype) for x in inputs] != self._graph_sig:
                return plan.forward(inputs, self.consts_on(plan, dev))
        for s, x in zip(self._static_in, inputs):
            s.copy_(x)
        self._graph.replay()
        return [o.clone() for o in self._static_out]

    def consts_on(self, plan: Plan, device) -> dict:
        key = str(device)
        consts = self._consts.get(key)
        if consts is None:
            consts = self._consts[key] = {i: t.to(device) for i, t in plan.const_slots}
        return consts

    def ensure_runnable(self, plan: Plan, inputs) -> torch.device:
        from kiln.kernels.triton.launch import interpreting

        dev = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        if dev.type == "cuda":
            self._load_cuda_c(plan)
            return dev
        if interpreting():  # Triton's CPU interpreter: only for checking generated code
            return dev
        a = self.ahead
        n = sum(a.counts(sm)["triton"] + a.counts(sm)["cuda_c"] for sm in a.sms[:1]) if a else 0
        raise KilnError(f"{plan.graph.name} was compiled for {plan.target} ahead of time ({n} kernels built to "
                        f"cubin); running it needs an NVIDIA GPU with a CUDA build of torch and the inputs on it "
                        f"(torch.cuda.is_available() is {torch.cuda.is_available()}, inputs are on {dev})")

    def _load_cuda_c(self, plan: Plan) -> None:
        from kiln.codegen.cuda import CupyKernels

        pending = [g for g in self.generated if g.cuda_r is not None and g.cupy is None]
        if not pending:
            return
        try:
            sources = {g.cuda_r.name: g.cuda_r.source for g in pending}
            cubin = self.ahead.cubins.get(plan.target.sm) if self.ahead else None
            mod = CupyKernels(sources, cubin)
        except Exception:  # noqa: BLE001  (no CuPy/NVRTC on this device: Triton covers these groups)
            mod = None
        for g in pending:
            g.cupy = mod
            if mod is None:
                g.cuda_r = None

    def _capture(self, plan: Plan, inputs, dev) -> None:
        """Replay the whole plan as one CUDA graph: one launch instead of one per kernel
        (the per-kernel Python and launch overhead dominates small batches)."""
        consts = self.consts_on(plan, dev)
        try:
            self._static_in = [x.clone() for x in inputs]
            plan.forward(self._static_in, consts)  # warm on the side stream's allocator
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._static_out = plan.forward(self._static_in, consts)
            self._graph = g
            self._graph_sig = [(tuple(x.shape), x.stride(), x.dtype) for x in inputs]
        except Exception:  # noqa: BLE001  (a step that cannot be captured: run step by step)
            self._graph = False


# ----------------------------------------------------------------------------- ahead of time
def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")


def record_launches(plan: Plan) -> list:
    """Replay the plan on meta tensors; return every Triton launch it would make (steps that
    run a torch reference only produce empty outputs)."""
    from kiln.kernels.triton.launch import recording

    def call(step, operands):
        if step.kernel.startswith(TORCH_PREFIX):
            outs = [empty_like_value(plan.values[i], "meta") for i in step.outs]
            return outs[0] if len(outs) == 1 else outs
        return step.fn(operands, step.attrs)

    inputs = [empty_like_value(v, "meta") for v in plan.graph.inputs]
    with recording() as records, torch.no_grad():
        plan.interpret(inputs, consts={i: _meta(t) for i, t in plan.const_slots}, call=call)
    return list(records)


def build_ahead(plan: Plan, sms: tuple[int, ...] | None = None) -> AheadReport:
    """Compile every distinct kernel of the plan to cubin for each SM in ``sms``."""
    from kiln.codegen import cuda as cgen
    from kiln.kernels.triton.launch import compile_many, dedupe

    t0 = time.perf_counter()
    sms = sms or (plan.target.sm,)
    records = dedupe(record_launches(plan))
    report = AheadReport(tuple(sms))
    cuda_sources = {g.cuda_r.name: g.cuda_r.source for g in plan.runner.generated if g.cuda_r is not None}
    report.triton = compile_many(records, sms)
    for sm in sms:
        if cuda_sources:
            try:
                report.cubins[sm] = cgen.compile_cubin(list(cuda_sources.values()), sm)
                report.cuda[sm] = list(cuda_sources)
            except Exception as e:  # noqa: BLE001  (reported, never hidden)
                report.cuda_errors[sm] = f"{type(e).__name__}: {e}"
                report.cuda[sm] = []
    report.seconds = time.perf_counter() - t0
    return report
