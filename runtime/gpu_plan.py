"""Plans for the cuda target: kernel groups as Triton / CUDA C / library kernel launches.

Each kernel group becomes steps over buffer slots (as in runtime.plan):

* injective and reduction groups: generated kernels (codegen.triton; for injective
  groups also codegen.cuda, the two competing on the device), or the Triton library's
  layer norm / softmax for a lone normalization;
* compute, attention and recurrent groups: the registered Triton library kernel for the
  anchor, then a generated kernel for the group's epilogue nodes (reshape, permute, ...);
* anything no renderer or library kernel covers runs its torch reference on the device
  (named in ``GpuPlan.torch_ops``).

Building the plan also builds every kernel ahead of time (``build_ahead``): the plan
is replayed on meta tensors with Triton launches recorded, and each distinct Triton
specialization and CUDA C kernel is compiled to cubin for the target SM. That is all
that can be done without a GPU; running the plan then needs one (or, for tests, Triton's
interpreter on CPU tensors, with the CUDA C kernels left out).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch

from kiln.errors import KilnError
from kiln.ir import Graph, LayoutKind, Node, OpKind, Value
from kiln.kernels.registry import select_kernel
from kiln.runtime.plan import slots_for
from kiln.passes.partition import GroupKind, KernelGroup, Partition, partition as make_partition


@dataclass
class GpuStep:
    kind: str  # "triton" | "library" | "torch"
    label: str
    fn: object  # fn(list[Tensor]) -> list[Tensor]
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    free: tuple[int, ...] = ()
    out_values: tuple = ()
    nodes: tuple = ()


@dataclass
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


def empty_like_value(v: Value, device) -> torch.Tensor:
    shape = tuple(int(d) for d in v.type.shape)
    fmt = torch.channels_last if (v.type.layout.kind is LayoutKind.CHANNELS_LAST and len(shape) == 4) \
        else torch.contiguous_format
    return torch.empty(shape, dtype=v.type.dtype.to_torch(), device=device, memory_format=fmt)


class GeneratedKernel:
    """A rendered group kernel: its Triton form and, for injective kernels, its CUDA C form."""

    def __init__(self, triton_r, cuda_r=None):
        from kiln.codegen import triton as tgen

        self.r = triton_r
        self.cuda_r = cuda_r
        self.fn = tgen.load(triton_r)
        self.space = tgen.space_for(triton_r)
        self.cupy = None  # set once CUDA C kernels are loaded on a device
        self.renderer = None  # chosen on first device run: "triton" | "cuda"

    def _launch_triton(self, ins, outs, cfg):
        import triton

        from kiln.kernels.triton.launch import launch
        from kiln.kernels.triton.tuning import launch_params

        meta, warps, _ = launch_params(cfg)
        n = self.r.numel
        if self.r.reduce_extent:
            meta["RBLOCK"] = triton.next_power_of_2(self.r.reduce_extent)
            grid = (triton.cdiv(n, meta["XBLOCK"]),)
        else:
            grid = (triton.cdiv(n, meta["BLOCK"]),)
        launch(self.fn, grid, (*ins, *outs, n), meta, warps, 1)

    def __call__(self, ins: list[torch.Tensor], in_values=None, out_values=None) -> list[torch.Tensor]:
        from kiln.kernels.triton.tuning import choose_config, on_device, signature_of

        device = ins[0].device if ins else torch.device("cuda")
        ins = [_as_layout(t, v) for t, v in zip(ins, in_values or self.r.inputs)]
        outs = [empty_like_value(v, device) for v in (out_values or self.r.outputs)]
        if self.renderer is None:
            if on_device(*ins) and self.cuda_r is not None and self.cupy is not None:
                self.renderer = self._pick_renderer(ins, outs)
            else:
                self.renderer = "triton"
        if self.renderer == "cuda":
            self.cupy.launch(self.cuda_r.name, [*ins, *outs], self.r.numel)
            return outs
        sig = signature_of(*ins)  # the kernel's name carries its source's hash
        cfg = choose_config(f"gen.{self.r.name}", self.space, sig, lambda c: self._launch_triton(ins, outs, c), *ins)
        self._launch_triton(ins, outs, cfg)
        return outs

    def _pick_renderer(self, ins, outs) -> str:
        """Triton and CUDA C compete on the device; the winner is stored with the target."""
        from kiln.codegen.autotune import Space, TuningKey, tune
        from kiln.kernels.triton.tuning import _target_key, signature_of
        from triton.testing import do_bench

        def measure(cfg):
            if cfg["renderer"] == "cuda":
                return do_bench(lambda: self.cupy.launch(self.cuda_r.name, [*ins, *outs], self.r.numel),
                                warmup=5, rep=20)
            return do_bench(lambda: self._launch_triton(ins, outs, self.space.default()), warmup=5, rep=20)

        res = tune(TuningKey(f"gen.renderer.{self.r.name}", signature_of(*ins), _target_key()),
                   Space.of(renderer=["triton", "cuda"]), measure, "max")
        return res.config["renderer"]


def _as_layout(t: torch.Tensor, v: Value) -> torch.Tensor:
    """The tensor with the strides the generated code assumes for ``v`` (its IR layout);
    a copy only when a producer chose another memory format."""
    from kiln.codegen.render import physical_strides

    want = physical_strides(v)
    if all(a == b for a, b, n in zip(t.stride(), want, t.shape) if n != 1) and t.dim() == len(want):
        return t
    return torch.empty_strided(tuple(t.shape), want, dtype=t.dtype, device=t.device).copy_(t)


def _torch_step(node: Node):
    from kiln.kernels.registry import select_kernel as sel

    k = sel(node, "reference")
    fn = k.fn

    def run(ins):
        r = fn(ins, node.attrs)
        return list(r) if isinstance(r, tuple) else [r]

    return run


def _library_step(node: Node, kernel):
    def run(ins):
        r = kernel.fn(ins, node.attrs)
        return list(r) if isinstance(r, tuple) else [r]

    return run


def _subgroup(nodes: list[Node], group: KernelGroup, gid: int) -> KernelGroup:
    inside = {o for n in nodes for o in n.outputs}
    sub = KernelGroup(gid, GroupKind.INJECTIVE, list(nodes))
    sub.outputs = [v for v in group.outputs if v in inside]
    seen = []
    for n in nodes:
        for v in n.inputs:
            if v is not None and v not in inside and v not in seen:
                seen.append(v)
    sub.inputs = seen
    return sub


@dataclass
class GpuPlan:
    graph: Graph
    target: object  # kiln.target.Target
    steps: list[GpuStep]
    num_slots: int
    input_slots: tuple[int, ...]
    output_slots: tuple[int, ...]
    const_slots: tuple[tuple[int, torch.Tensor], ...]
    kernel_names: dict[str, int] = field(default_factory=dict)
    torch_ops: dict[str, str] = field(default_factory=dict)  # op -> why it runs in torch
    generated: list = field(default_factory=list)  # GeneratedKernel, one per distinct kernel
    ahead: AheadReport | None = None
    partition: object = None
    pass_records: list = field(default_factory=list)
    cache_hit: bool = False
    memory: object = None
    _device_consts: dict = field(default_factory=dict)
    _graph: object = None  # a captured torch.cuda.CUDAGraph, False when capture failed
    _graph_sig: list = field(default_factory=list)
    _static_in: list = field(default_factory=list)
    _static_out: list = field(default_factory=list)
    _runs: int = 0

    def _consts_on(self, device) -> tuple:
        key = str(device)
        if key not in self._device_consts:
            self._device_consts[key] = tuple((i, t.to(device)) for i, t in self.const_slots)
        return self._device_consts[key]

    def _ensure_runnable(self, inputs) -> torch.device:
        from kiln.kernels.triton.launch import _interpreting

        dev = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        if dev.type == "cuda":
            self._load_cuda_c()
            return dev
        if _interpreting():  # Triton's CPU interpreter: only for checking generated code
            return dev
        n = sum(self.ahead.counts(sm)["triton"] + self.ahead.counts(sm)["cuda_c"] for sm in self.ahead.sms[:1]) \
            if self.ahead else 0
        raise KilnError(f"{self.graph.name} was compiled for {self.target} ahead of time ({n} kernels built to "
                        f"cubin); running it needs an NVIDIA GPU with a CUDA build of torch and the inputs on it "
                        f"(torch.cuda.is_available() is {torch.cuda.is_available()}, inputs are on {dev})")

    def _load_cuda_c(self):
        from kiln.codegen.cuda import CupyKernels

        pending = [g for g in self.generated if g.cuda_r is not None and g.cupy is None]
        if not pending:
            return
        try:
            sources = {g.cuda_r.name: g.cuda_r.source for g in pending}
            cubin = self.ahead.cubins.get(self.target.sm) if self.ahead else None
            mod = CupyKernels(sources, cubin)
        except Exception:  # noqa: BLE001  (no CuPy/NVRTC on this device: Triton covers these groups)
            mod = None
        for g in pending:
            g.cupy = mod
            if mod is None:
                g.cuda_r = None

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        dev = self._ensure_runnable(inputs)
        if dev.type != "cuda" or os.environ.get("KILN_CUDA_GRAPHS", "1") == "0" or self._graph is False:
            return self._run_steps(inputs, dev)
        self._runs += 1
        if self._graph is None:
            if self._runs < 3:  # the first calls tune and JIT-compile; capture once that is done
                return self._run_steps(inputs, dev)
            self._capture(inputs, dev)
            if self._graph is False:
                return self._run_steps(inputs, dev)
        if [(tuple(x.shape), x.stride(), x.dtype) for x in inputs] != self._graph_sig:
            return self._run_steps(inputs, dev)
        for s, x in zip(self._static_in, inputs):
            s.copy_(x)
        self._graph.replay()
        return [o.clone() for o in self._static_out]

    def _capture(self, inputs, dev):
        """Replay the whole plan as one CUDA graph: one launch instead of one per kernel
        (the per-kernel Python and launch overhead dominates small batches)."""
        try:
            self._static_in = [x.clone() for x in inputs]
            self._run_steps(self._static_in, dev)  # warm on the side stream's allocator
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self._static_out = self._run_steps(self._static_in, dev)
            self._graph = g
            self._graph_sig = [(tuple(x.shape), x.stride(), x.dtype) for x in inputs]
        except Exception:  # noqa: BLE001  (a step that cannot be captured: run step by step)
            self._graph = False

    def _run_steps(self, inputs, dev) -> list[torch.Tensor]:
        slots: list = [None] * self.num_slots
        for i, t in self._consts_on(dev):
            slots[i] = t
        for i, t in zip(self.input_slots, inputs):
            slots[i] = t
        for s in self.steps:
            try:
                outs = s.fn([None if i is None else slots[i] for i in s.ins])
            except KilnError:
                raise
            except Exception as e:
                raise KilnError(f"{s.kind} kernel {s.label} failed: {type(e).__name__}: {e}") from e
            for i, t in zip(s.outs, outs):
                slots[i] = t
            for i in s.free:
                slots[i] = None
        return [slots[i] for i in self.output_slots]


def build_gpu_plan(graph: Graph, part: Partition | None, target, ahead: bool = True) -> GpuPlan:
    from kiln.codegen import cuda as cgen
    from kiln.codegen import triton as tgen
    from kiln.codegen.render import Unsupported
    from kiln.kernels.triton import ops as _register  # noqa: F401  (registers the cuda kernels)

    part = part if part is not None else make_partition(graph)
    slot, get, input_slots, const_slots = slots_for(graph)
    steps: list[GpuStep] = []
    counts: dict[str, int] = {}
    torch_ops: dict[str, str] = {}
    kernels: dict[str, GeneratedKernel] = {}

    def add(kind, label, fn, ins, outs, nodes):
        counts[label] = counts.get(label, 0) + 1
        steps.append(GpuStep(kind, label, fn, tuple(None if v is None else get(v) for v in ins),
                             tuple(get(v) for v in outs), (), tuple(outs), tuple(nodes)))

    def torch_nodes(nodes, why):
        for n in nodes:
            torch_ops.setdefault(n.op.value, why)
            add("torch", f"torch.{n.op.value}", _torch_step(n), n.inputs, n.outputs, [n])

    def generated(group: KernelGroup) -> bool:
        if not group.outputs:
            return True
        try:
            rs = tgen.render_group(group)
        except Unsupported as e:
            torch_nodes(group.nodes, str(e))
            return False
        try:
            crs = {id(r): c for r, c in zip(rs, cgen.render_group(group))}
        except Unsupported:
            crs = {}
        for r in rs:
            g = kernels.get(r.name)
            if g is None:
                g = kernels[r.name] = GeneratedKernel(r, crs.get(id(r)))
            add("triton", "gen." + ("reduction" if r.reduce_extent else "elementwise"),
                lambda ins, g=g, r=r: g(ins, r.inputs, r.outputs), r.inputs, r.outputs, group.nodes)
        return True

    for group in part.groups:
        if group.kind in (GroupKind.INJECTIVE, GroupKind.REDUCTION):
            if len(group.nodes) == 1 and group.nodes[0].op in (OpKind.LAYER_NORM, OpKind.SOFTMAX, OpKind.LOG_SOFTMAX):
                k = select_kernel(group.nodes[0], "cuda")
                if k.target == "cuda":
                    add("library", k.name, _library_step(group.nodes[0], k), group.nodes[0].inputs,
                        group.nodes[0].outputs, group.nodes)
                    continue
            generated(group)
            continue
        if group.kind == GroupKind.FALLBACK:
            torch_nodes(group.nodes, "not compiled by Kiln")
            continue
        anchor, tail = group.nodes[0], group.nodes[1:]
        k = select_kernel(anchor, "cuda")
        if k.target == "cuda":
            add("library", k.name, _library_step(anchor, k), anchor.inputs, anchor.outputs, [anchor])
        else:
            torch_nodes([anchor], "no cuda kernel accepts it")
        if tail:
            generated(_subgroup(tail, group, group.id))

    _free_dead(steps, graph, slot)
    plan = GpuPlan(graph, target, steps, len(slot), input_slots, tuple(get(v) for v in graph.outputs), const_slots,
                   counts, torch_ops, list(kernels.values()), partition=part)
    from kiln.kernels.triton.launch import _interpreting

    # Without a device, build every kernel now; with one, kernels JIT-compile (and tune) there
    if ahead and not _interpreting() and not torch.cuda.is_available():
        plan.ahead = build_ahead(plan)
    return plan


def _free_dead(steps: list[GpuStep], graph: Graph, slot: dict) -> None:
    keep = {slot[v] for v in list(graph.outputs) + list(graph.inputs) + list(graph.constants) if v in slot}
    last: dict[int, int] = {}
    for i, s in enumerate(steps):
        for j in s.ins:
            if j is not None:
                last[j] = i
    for i, s in enumerate(steps):
        dead = {j for j in s.ins if j is not None and last.get(j) == i and j not in keep}
        dead |= {j for j in s.outs if j not in last and j not in keep}
        s.free = tuple(sorted(dead))


# ----------------------------------------------------------------------------- ahead of time
def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta")


def record_launches(plan: GpuPlan) -> list:
    """Replay the plan on meta tensors; return every Triton launch it would make."""
    from kiln.kernels.triton.launch import recording

    slots: list = [None] * plan.num_slots
    for i, t in plan.const_slots:
        slots[i] = _meta(t)
    for i, v in zip(plan.input_slots, plan.graph.inputs):
        slots[i] = empty_like_value(v, "meta")
    with recording() as records, torch.no_grad():
        for s in plan.steps:
            if s.kind == "torch":
                outs = [empty_like_value(v, "meta") for v in s.out_values]
            else:
                outs = s.fn([None if i is None else slots[i] for i in s.ins])
            for i, t in zip(s.outs, outs):
                slots[i] = t
    return list(records)


def build_ahead(plan: GpuPlan, sms: tuple[int, ...] | None = None) -> AheadReport:
    """Compile every distinct kernel of the plan to cubin for each SM in ``sms``."""
    from kiln.codegen import cuda as cgen
    from kiln.kernels.triton.launch import compile_many, dedupe

    t0 = time.perf_counter()
    sms = sms or (plan.target.sm,)
    records = dedupe(record_launches(plan))
    report = AheadReport(tuple(sms))
    cuda_sources = {g.cuda_r.name: g.cuda_r.source for g in plan.generated if g.cuda_r is not None}
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
