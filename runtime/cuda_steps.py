"""The steps of a cuda plan: kernel groups as Triton / CUDA C / library kernel launches.

Each kernel group becomes steps of the one plan structure (``runtime.plan``):

* injective and reduction groups: generated kernels (codegen.triton; for injective
  groups also codegen.cuda, the two competing on the device), or the Triton library's
  layer norm / softmax for a lone normalization;
* compute, attention and recurrent groups: the registered Triton library kernel for the
  anchor, then a generated kernel for the group's epilogue nodes (reshape, permute, ...);
* anything no renderer or library kernel covers runs its torch reference on the device
  (named in ``Plan.torch_ops``).

The plan runs through a ``runtime.cuda_run.CudaRunner``. Building it also builds every
kernel ahead of time when no GPU is present (``cuda_run.build_ahead``); running it then
needs one (or, for tests, Triton's interpreter on CPU tensors, with the CUDA C kernels left
out).
"""
from __future__ import annotations

import time

import torch

from kiln.ir import Graph, LayoutKind, OpKind, Value
from kiln.kernels.registry import select_kernel
from kiln.passes.partition import GroupKind, KernelGroup, Partition, partition as make_partition, subgroup
from kiln.target import Target

from .plan import Plan, Unit, assemble

TORCH_PREFIX = "torch."  # the kernel name of a step that runs an op's torch reference


def empty_like_value(v: Value, device) -> torch.Tensor:
    shape = tuple(int(d) for d in v.type.shape)
    fmt = torch.channels_last if (v.type.layout.kind is LayoutKind.CHANNELS_LAST and len(shape) == 4) \
        else torch.contiguous_format
    return torch.empty(shape, dtype=v.type.dtype.to_torch(), device=device, memory_format=fmt)


class GpuGroupKernel:
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
        from kiln.kernels.triton.tuning import signature_of, target_key
        from triton.testing import do_bench

        def measure(cfg):
            if cfg["renderer"] == "cuda":
                return do_bench(lambda: self.cupy.launch(self.cuda_r.name, [*ins, *outs], self.r.numel),
                                warmup=5, rep=20)
            return do_bench(lambda: self._launch_triton(ins, outs, self.space.default()), warmup=5, rep=20)

        res = tune(TuningKey(f"gen.renderer.{self.r.name}", signature_of(*ins), target_key()),
                   Space.of(renderer=["triton", "cuda"]), measure, "max")
        return res.config["renderer"]


def run_generated(ins: list[torch.Tensor], launch) -> "torch.Tensor | list[torch.Tensor]":
    """A step's kernel function for one rendered kernel: ``launch`` is (GpuGroupKernel, the
    rendered kernel it launches)."""
    kernel, r = launch
    outs = kernel(ins, r.inputs, r.outputs)
    return outs[0] if len(outs) == 1 else outs


def _as_layout(t: torch.Tensor, v: Value) -> torch.Tensor:
    """The tensor with the strides the generated code assumes for ``v`` (its IR layout);
    a copy only when a producer chose another memory format."""
    from kiln.codegen.render import physical_strides

    want = physical_strides(v)
    if all(a == b for a, b, n in zip(t.stride(), want, t.shape) if n != 1) and t.dim() == len(want):
        return t
    return torch.empty_strided(tuple(t.shape), want, dtype=t.dtype, device=t.device).copy_(t)


_LONE_LIBRARY_OPS = (OpKind.LAYER_NORM, OpKind.SOFTMAX, OpKind.LOG_SOFTMAX)


def build_gpu_plan(graph: Graph, part: Partition | None, target: "str | Target", tune="fast",
                   ahead: bool = True) -> Plan:
    """The cuda plan of ``graph`` (partitioned as ``part``, or here); kernels tune on the
    device within ``tune`` ("none" | "fast" | "max" | seconds per kernel). With ``ahead`` and
    no GPU present, every kernel is built to cubin now."""
    from kiln.codegen import cuda as cgen
    from kiln.codegen import triton as tgen
    from kiln.codegen.render import Unsupported
    from kiln.kernels.triton import ops as _register  # noqa: F401  (registers the cuda kernels)
    from kiln.kernels.triton.launch import interpreting

    from .cuda_run import CudaRunner, build_ahead

    target = Target.parse(target)
    part = part if part is not None else make_partition(graph)
    units: list[Unit] = []
    node_kernel: dict = {}
    torch_ops: dict[str, str] = {}
    kernels: dict[str, GpuGroupKernel] = {}
    codegen_s = 0.0

    def add(name, fn, attrs, ins, outs, nodes):
        units.append(Unit(name, fn, attrs, tuple(ins), tuple(outs), nodes[-1]))
        for n in nodes:
            node_kernel[n] = name

    def torch_nodes(nodes, why):
        for n in nodes:
            torch_ops.setdefault(n.op.value, why)
            add(TORCH_PREFIX + n.op.value, select_kernel(n, "reference").fn, n.attrs, n.inputs, n.outputs, [n])

    def generated(group: KernelGroup) -> None:
        nonlocal codegen_s
        if not group.outputs:
            return
        t0 = time.perf_counter()
        try:
            rs = tgen.render_group(group)
        except Unsupported as e:
            codegen_s += time.perf_counter() - t0
            torch_nodes(group.nodes, str(e))
            return
        try:
            crs = {id(r): c for r, c in zip(rs, cgen.render_group(group))}
        except Unsupported:
            crs = {}
        for r in rs:
            g = kernels.get(r.name)
            if g is None:
                g = kernels[r.name] = GpuGroupKernel(r, crs.get(id(r)))
            add("gen." + ("reduction" if r.reduce_extent else "elementwise"), run_generated, (g, r),
                r.inputs, r.outputs, group.nodes)
        codegen_s += time.perf_counter() - t0

    def library(node) -> bool:
        k = select_kernel(node, "cuda")
        if k.target != "cuda":
            return False
        add(k.name, k.fn, node.attrs, node.inputs, node.outputs, [node])
        return True

    for group in part.groups:
        if group.kind in (GroupKind.INJECTIVE, GroupKind.REDUCTION):
            if not (len(group.nodes) == 1 and group.nodes[0].op in _LONE_LIBRARY_OPS and library(group.nodes[0])):
                generated(group)
            continue
        if group.kind == GroupKind.FALLBACK:
            torch_nodes(group.nodes, "not compiled by Kiln")
            continue
        anchor, tail = group.nodes[0], group.nodes[1:]
        if not library(anchor):
            torch_nodes([anchor], "no cuda kernel accepts it")
        if tail:
            generated(subgroup(graph, group, tail))

    plan = assemble(graph, target, units, node_kernels=[node_kernel.get(n, "") for n in graph.nodes],
                    codegen_seconds=codegen_s, torch_ops=torch_ops, runner=CudaRunner(list(kernels.values()), tune))
    # Without a device, build every kernel now; with one, kernels JIT-compile (and tune) there
    if ahead and not interpreting() and not torch.cuda.is_available():
        plan.runner.ahead = build_ahead(plan)
    return plan
