"""CUDA C renderer: fused elementwise (injective) groups as CUDA C kernels.

The walk is codegen.walk's, the text emitter codegen.render's; this file is CUDA C syntax
and the per-op table. One
thread per output element. Kernels are compiled with nvcc to a cubin for the target SM
(``compile_cubin``; this works on machines without a GPU) and loaded with CuPy's
RawModule on a GPU (NVRTC when nvcc is absent there).
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import tempfile

from kiln.ir import DType, OpKind
from kiln.ir import attrs as A

from .render import INFIX_OPS, E, KernelSpec, Rendered, TextEmitter, split_group
from .walk import Unsupported, numel, storage_offset, unflatten

C_TYPES = {DType.FLOAT32: "float", DType.FLOAT64: "double", DType.INT64: "long long", DType.INT32: "int",
           DType.INT16: "short", DType.INT8: "signed char", DType.UINT8: "unsigned char", DType.BOOL: "bool"}


def _dt(n):
    return n.outputs[0].type.dtype


def _f(x: str) -> str:
    return f"((float)({x}))"


def _div(r, n, a, b):
    if not _dt(n).is_float:
        raise Unsupported("integer division")
    q = f"({_f(a)} / {_f(b)})"
    if n.attrs.rounding is A.Rounding.FLOOR:
        return f"floorf({q})"
    if n.attrs.rounding is A.Rounding.TRUNC:
        return f"truncf({q})"
    return q


def _gelu(r, n, x):
    if n.attrs.approximate is A.GeluApprox.TANH:
        return f"(0.5f * {x} * (1.0f + tanhf(0.7978845608028654f * ({x} + 0.044715f * {x} * {x} * {x}))))"
    return f"(0.5f * {x} * (1.0f + erff({x} * 0.7071067811865476f)))"


def _clamp(r, n, x):
    out = x
    if n.attrs.min is not None:
        out = f"max({out}, ({C_TYPES[_dt(n)]}){r.literal(n.attrs.min, _dt(n))})"
    if n.attrs.max is not None:
        out = f"min({out}, ({C_TYPES[_dt(n)]}){r.literal(n.attrs.max, _dt(n))})"
    return out


CUDA_OPS = {
    **INFIX_OPS,
    OpKind.NEG: lambda r, n, x: f"(-{x})",
    OpKind.ABS: lambda r, n, x: f"(({x}) < 0 ? -({x}) : ({x}))",
    OpKind.EXP: lambda r, n, x: f"expf({_f(x)})",
    OpKind.LOG: lambda r, n, x: f"logf({_f(x)})",
    OpKind.SQRT: lambda r, n, x: f"sqrtf({_f(x)})",
    OpKind.RSQRT: lambda r, n, x: f"rsqrtf({_f(x)})",
    OpKind.RECIPROCAL: lambda r, n, x: f"(1.0f / {_f(x)})",
    OpKind.RELU: lambda r, n, x: f"(({x}) > 0 ? ({x}) : 0)",
    OpKind.SIGMOID: lambda r, n, x: f"(1.0f / (1.0f + expf(-{_f(x)})))",
    OpKind.TANH: lambda r, n, x: f"tanhf({_f(x)})",
    OpKind.ERF: lambda r, n, x: f"erff({_f(x)})",
    OpKind.SILU: lambda r, n, x: f"({x} / (1.0f + expf(-{_f(x)})))",
    OpKind.GELU: _gelu,
    OpKind.LEAKY_RELU: lambda r, n, x: f"(({x}) >= 0 ? ({x}) : ({x}) * {n.attrs.alpha!r}f)",
    OpKind.CLAMP: _clamp,
    OpKind.NOT: lambda r, n, x: f"(!({x}))",
    OpKind.SIN: lambda r, n, x: f"sinf({_f(x)})",
    OpKind.COS: lambda r, n, x: f"cosf({_f(x)})",
    OpKind.FLOOR: lambda r, n, x: f"floorf({x})" if _dt(n).is_float else x,
    OpKind.CEIL: lambda r, n, x: f"ceilf({x})" if _dt(n).is_float else x,
    OpKind.SIGN: lambda r, n, x: f"(({x}) > 0 ? 1 : (({x}) < 0 ? -1 : 0))",
    **{k: (lambda r, n, x, f=k.value: f"{f}f({_f(x)})")
       for k in (OpKind.ACOS, OpKind.ASIN, OpKind.ATAN, OpKind.ACOSH, OpKind.ASINH, OpKind.ATANH)},
    OpKind.ATAN2: lambda r, n, a, b: f"atan2f({_f(a)}, {_f(b)})",
    # rintf rounds half to even, as torch.round does (roundf rounds half away from zero)
    OpKind.ROUND: lambda r, n, x: f"rintf({x})" if _dt(n).is_float else x,
    OpKind.CAST: lambda r, n, x: r.cast(f"(({x}) != 0)" if n.attrs.dtype is DType.BOOL else x, n.attrs.dtype),
    OpKind.ISNAN: lambda r, n, x: f"(({x}) != ({x}))",
    OpKind.DIV: _div,
    OpKind.MAXIMUM: lambda r, n, a, b: f"max({a}, {b})",
    OpKind.MINIMUM: lambda r, n, a, b: f"min({a}, {b})",
    OpKind.AND: lambda r, n, a, b: f"(({a}) && ({b}))",
    OpKind.OR: lambda r, n, a, b: f"(({a}) || ({b}))",
    OpKind.WHERE: lambda r, n, c, a, b: f"(({c}) ? ({a}) : ({b}))",
}


class CudaEmitter(TextEmitter):
    OPS = CUDA_OPS
    target = "cuda"
    AND = "&&"

    def __init__(self, spec: KernelSpec):
        if spec.anchor is not None:
            raise Unsupported("the CUDA C renderer covers elementwise groups only")
        super().__init__(spec)

    def assign(self, name, code):
        return f"auto {name} = {code};"

    def floordiv_code(self, a, b):
        return f"{a} / {b}"

    def mod_code(self, a, b):
        return f"{a} % {b}"

    def imin(self, a, b):
        return f"min((long long)({a}), (long long)({b}))"

    def imax(self, a, b):
        return f"max((long long)({a}), (long long)({b}))"

    def select_code(self, c, a, b):
        return f"(({c}) ? ({a}) : ({b}))"

    def cast(self, code, dtype):
        if dtype not in C_TYPES:
            raise Unsupported(f"dtype {dtype.value}")
        return f"(({C_TYPES[dtype]})({code}))"

    def literal(self, x, dtype):
        if isinstance(x, float) and not math.isfinite(x):
            return "(__int_as_float(0x7f800000))" if x > 0 else "(-__int_as_float(0x7f800000))" \
                if x < 0 else "(__int_as_float(0x7fc00000))"
        return f"{float(x)!r}f" if dtype.is_float else repr(int(x))

    def sqrt(self, code):
        return f"sqrtf({code})"

    def load_code(self, arg, offset, v):
        if v.type.dtype not in C_TYPES:
            raise Unsupported(f"dtype {v.type.dtype.value}")
        return f"in{arg}[{offset.code}]"

    def render(self, name: str) -> Rendered:
        spec = self.spec
        coords = unflatten(self, E("offs"), spec.shape)
        stores = []
        for k, out in enumerate(spec.outputs):
            if out.type.dtype not in C_TYPES:
                raise Unsupported(f"dtype {out.type.dtype.value}")
            val = self.walker.value_at(out, coords)
            off = storage_offset(self, out, coords)
            stores.append(f"out{k}[{off.code}] = ({C_TYPES[out.type.dtype]})({val.code});")
        params = [f"const {C_TYPES[v.type.dtype]}* __restrict__ in{i}" for i, v in enumerate(self.inputs)]
        params += [f"{C_TYPES[v.type.dtype]}* __restrict__ out{i}" for i, v in enumerate(spec.outputs)]
        body = [f'extern "C" __global__ void {name}({", ".join(params)}, long long XN) {{',
                "    long long offs = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
                "    if (offs >= XN) return;"] + ["    " + ln for ln in self.lines + stores] + ["}"]
        return Rendered(name, "\n".join(body) + "\n", list(self.inputs), list(spec.outputs), numel(spec.shape), 0,
                        "cuda")


def render_group(group) -> list[Rendered]:
    out = []
    for spec in split_group(group):
        r = CudaEmitter(spec).render("KILN_KERNEL")
        r.name = f"kiln_cu_{hashlib.sha256(r.source.encode()).hexdigest()[:12]}"
        r.source = r.source.replace("KILN_KERNEL", r.name, 1)
        out.append(r)
    return out


def nvcc() -> str | None:
    return shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc") or None


def compile_cubin(sources: list[str], sm: int, timeout: float = 300) -> bytes:
    """One cubin holding every kernel in ``sources`` (one nvcc run per SM)."""
    exe = nvcc()
    if exe is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory(prefix="kiln-nvcc-") as d:
        src = os.path.join(d, "kernels.cu")
        with open(src, "w") as f:
            f.write("\n".join(sources))
        out = os.path.join(d, "kernels.cubin")
        p = subprocess.run([exe, "-cubin", f"-arch=sm_{sm}", "-O3", "-o", out, src], capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"nvcc failed for sm_{sm}: {p.stderr.strip()[-2000:]}")
        with open(out, "rb") as f:
            return f.read()


class CupyKernels:
    """CUDA C kernels loaded on the device: from a cubin when nvcc built one, else NVRTC."""

    def __init__(self, sources: dict[str, str], cubin: bytes | None):
        import cupy

        if cubin is not None:
            with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
                f.write(cubin)
                path = f.name
            self.module = cupy.RawModule(path=path)
        else:
            self.module = cupy.RawModule(code="\n".join(sources.values()))
        self.fns = {name: self.module.get_function(name) for name in sources}

    def launch(self, name: str, tensors, n: int, block: int = 256) -> None:
        import cupy
        import torch

        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
        args = tuple(cupy.asarray(t) for t in tensors) + (cupy.int64(n),)
        with stream:
            self.fns[name](((n + block - 1) // block,), (block,), args)
