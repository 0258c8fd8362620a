"""Microbenchmark of Kiln's quantized CPU GEMMs (and the int8 conv built on them) against torch on the same threads.

    python -m kiln.bench.int8_gemm [--threads 1 2] [--repeats 30] [--size 1024]
        [--only square bert int4 conv epilogue]

Five tables, every engine of a table timed interleaved (one call of each per round, so a
noisy neighbour slows all of them alike), median over rounds:

1. square 1024^3 GEMM: Kiln int8 (uint8 activations x int8 weights -> fp32 with the fused
   dequantize epilogue) on the VNNI and the AMX path vs torch fp32 ``x @ w.T`` and
   torch's ``_int_mm`` (int8 -> int32). GOP/s count 2*M*N*K; ratio = torch fp32 time /
   engine time (the speedup); the best round is printed beside the median.
2. BERT-base linear shapes (M=128 tokens): Kiln ``qlinear_dynamic`` (quantizes the fp32
   input per row inside the call) vs torch fp32, torch's dynamic int8 Linear (fbgemm) and
   ONNX Runtime's dynamically quantized MatMul when onnxruntime is installed.
3. int4 weight-only ``linear_int4`` (group 128) vs torch fp32, for decode (M=1) and M=128.
4. ResNet-18 convs: ``qconv2d_nhwc`` (uint8 NHWC in, fused bias + relu + requantize, uint8
   out) vs torch fp32 conv and torch's int8 conv (fbgemm, quantized tensors in and out).
5. The fused activation epilogue (csrc/simd_math.h) on small and on saturating outputs:
   ``linear_int4`` with an identity weight (so y = act(x)) over 4096 x 256 outputs of
   |x| ~ 1 and ~ 30, each activation against none. Where a step of an activation
   underflows into denormals the second row costs far more than the first (see the note
   in simd_math.h).

Timings include each engine's whole call (Kiln: the torch <-> numpy views too). Kiln and
torch fp32 write into preallocated outputs (``out=``), as a compiled plan does; torch's
quantized modules and ONNX Runtime allocate theirs (they offer no out argument).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from kiln.ir import qformat
from kiln.kernels import int8_cpu as q


def _interleaved(engines: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """engine -> (median, best) seconds per call."""
    from kiln.kernels.timing import interleaved

    # two warm-up calls each: first-call allocations, thread pool start
    timed = interleaved(list(engines.values()), repeats, warmup=2)
    return {name: (t.median, t.best) for name, t in zip(engines, timed)}


def _report(title: str, ops: float, res: dict[str, tuple[float, float]], base: str) -> None:
    """Median time, GOP/s and ratio to `base` from the medians; the best round in brackets
    (what the code can do when the machine leaves it alone)."""
    print(f"  {title}")
    bm, bb = res[base]
    for name, (med, best) in res.items():
        print(f"    {name:<28} {med * 1e3:9.3f} ms {ops / med / 1e9:8.1f} GOP/s  x{bm / med:5.2f}"
              f"   [best {best * 1e3:8.3f} ms {ops / best / 1e9:8.1f} GOP/s x{bb / best:5.2f}]")
    print(f"    (ratios: torch fp32 time / engine time, i.e. speedup over {base})")


def _ort_dynamic_matmul(w: torch.Tensor, threads: int):
    """ONNX Runtime MatMul with weight w^T, quantized by onnxruntime's quantize_dynamic."""
    try:
        import os
        import tempfile

        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return None
    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w.T.contiguous().numpy(), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "mm.onnx"), os.path.join(d, "mm_q.onnx")
        onnx.save(model, src)
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"x": x})[0]


def square(threads: int, repeats: int, size: int) -> None:
    m = n = k = size
    w = torch.randn(n, k)
    w_q, w_scale = qformat.quantize_weight_int8(w)
    packed = q.prepack_int8(w_q, w_scale)
    x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8)
    x = torch.randn(m, k)
    a8, b8 = torch.randint(-128, 128, (m, k), dtype=torch.int8), w_q.T.contiguous()
    y, y32 = torch.empty(m, n), torch.empty(m, n, dtype=torch.int32)
    engines = {"torch fp32 linear": lambda: torch.mm(x, w.t(), out=y)}
    if q.capabilities()["amx"]:
        engines["kiln int8 AMX"] = lambda: q.qlinear_static(x_q, 0.02, 128, packed, path="amx", threads=threads, out=y)
    engines["kiln int8 VNNI"] = lambda: q.qlinear_static(x_q, 0.02, 128, packed, path="vnni", threads=threads, out=y)
    try:
        torch._int_mm(a8[:32, :64], b8[:64, :32])
        engines["torch _int_mm (int32 out)"] = lambda: torch._int_mm(a8, b8, out=y32)
    except (RuntimeError, AttributeError, TypeError):
        pass
    _report(f"{m}x{n}x{k} GEMM, {threads} thread(s)", 2.0 * m * n * k, _interleaved(engines, repeats),
            "torch fp32 linear")


def bert(threads: int, repeats: int) -> None:
    for k, n in [(768, 768), (768, 3072), (3072, 768)]:
        _bert_shape(threads, repeats, 128, k, n)


def _bert_shape(threads: int, repeats: int, m: int, k: int, n: int) -> None:
    w, b = torch.randn(n, k) * 0.05, torch.randn(n)
    x = torch.randn(m, k)
    w_q, w_scale = qformat.quantize_weight_int8(w)
    packed = q.prepack_int8(w_q, w_scale)
    fb = torch.ao.nn.quantized.dynamic.Linear(k, n, dtype=torch.qint8)
    fb.set_weight_bias(torch.quantize_per_channel(w, w_scale.double(), torch.zeros(n, dtype=torch.long), 0,
                                                  torch.qint8), b)
    y = torch.empty(m, n)
    engines = {"torch fp32 linear": lambda: torch.addmm(b, x, w.t(), out=y),
               "torch dynamic int8 (fbgemm)": lambda: fb(x),
               "kiln qlinear_dynamic auto": lambda: q.qlinear_dynamic(x, packed, b, threads=threads, out=y),
               "kiln qlinear_dynamic VNNI": lambda: q.qlinear_dynamic(x, packed, b, path="vnni",
                                                                     threads=threads, out=y)}
    ort_fn = _ort_dynamic_matmul(w, threads)
    if ort_fn is not None:
        xn = x.numpy()
        engines["onnxruntime dynamic int8"] = lambda: ort_fn(xn)
    _report(f"BERT linear M={m} K={k} N={n}, {threads} thread(s) (kiln auto = {q.int8_path(m)})",
            2.0 * m * n * k, _interleaved(engines, repeats), "torch fp32 linear")


def int4(threads: int, repeats: int) -> None:
    for m, k, n in [(1, 4096, 4096), (1, 768, 3072), (128, 768, 3072)]:
        _int4_shape(threads, repeats, m, k, n)


def _int4_shape(threads: int, repeats: int, m: int, k: int, n: int) -> None:
    w = torch.randn(n, k)
    w_packed, scales = qformat.quantize_weight_int4(w, 128)
    packed = q.prepack_int4(w_packed, scales)
    x = torch.randn(m, k)
    y = torch.empty(m, n)
    engines = {"torch fp32 linear": lambda: torch.mm(x, w.t(), out=y),
               "kiln linear_int4 g128": lambda: q.linear_int4(x, packed, threads=threads, out=y)}
    _report(f"int4 weight-only M={m} K={k} N={n}, {threads} thread(s) (weights {n * k // 2 / 1e6:.1f} MB int4,"
            f" {n * k * 4 / 1e6:.1f} MB fp32)", 2.0 * m * n * k, _interleaved(engines, repeats),
            "torch fp32 linear")


def epilogue(threads: int, repeats: int) -> None:
    n = 256
    packed = q.prepack_int4(qformat.pack_int4(torch.eye(n, dtype=torch.int64)), torch.ones(n, n // 64), 64)
    out = torch.empty(4096, n)
    for scale in (1.0, 30.0):
        x = torch.randn(4096, n) * scale
        engines = {act: (lambda act=act: q.linear_int4(x, packed, None, act, threads=threads, out=out))
                   for act in ("none", "gelu", "gelu_tanh", "silu")}
        res = _interleaved(engines, repeats)
        base = res["none"][0]
        print(f"  epilogue, {threads} thread(s), outputs |x| ~ {scale:g}: " + ", ".join(
            f"{act} {med * 1e3:.2f} ms (+{(med - base) * 1e3:.2f})" for act, (med, _) in res.items()))


def conv(threads: int, repeats: int) -> None:
    """ResNet-18 3x3 convs (batch 1, 224x224 input) and its strided 1x1 downsample."""
    for c, oc, h, k, stride, pad in [(64, 64, 56, 3, 1, 1), (128, 128, 28, 3, 1, 1), (256, 256, 14, 3, 1, 1),
                                     (512, 512, 7, 3, 1, 1), (64, 128, 56, 1, 2, 0)]:
        _conv_shape(threads, repeats, c, oc, h, k, stride, pad)


def _conv_shape(threads: int, repeats: int, c: int, oc: int, h: int, k: int, stride: int, pad: int) -> None:
    w = torch.randn(oc, c, k, k) * 0.05
    b = torch.randn(oc)
    x = torch.randn(1, c, h, h).relu()
    w_q, w_scale = qformat.quantize_weight_int8(w.reshape(oc, -1))
    w_q = w_q.reshape(oc, c, k, k)
    packed = q.prepack_conv_int8(w_q, w_scale)
    x_scale = float(x.max()) / 255
    x_q = torch.round(x / x_scale).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    qx = torch.quantize_per_tensor(x, x_scale, 0, torch.quint8)
    tq = torch.ao.nn.quantized.Conv2d(c, oc, k, stride=stride, padding=pad)
    tq.set_weight_bias(torch.quantize_per_channel(w, w_scale.double(), torch.zeros(oc, dtype=torch.long), 0,
                                                  torch.qint8), b)
    tq.scale, tq.zero_point = 0.05, 0
    oh = (h + 2 * pad - k) // stride + 1
    engines = {"torch fp32 F.conv2d": lambda: F.conv2d(x, w, b, stride, pad),
               "torch int8 conv (fbgemm)": lambda: tq(qx),
               "kiln qconv2d_nhwc u8->u8": lambda: q.qconv2d_nhwc(
                   x_q, x_scale, 0, packed, b, "relu", stride=stride, padding=pad, out_scale=0.05,
                   threads=threads)}
    _report(f"conv {k}x{k}/{stride} C={c} OC={oc} {h}x{h}, {threads} thread(s)",
            2.0 * oh * oh * oc * c * k * k, _interleaved(engines, repeats), "torch fp32 F.conv2d")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--size", type=int, default=1024, help="M = N = K of the square GEMM")
    ap.add_argument("--only", choices=["square", "bert", "int4", "conv", "epilogue"], nargs="+",
                    default=["square", "bert", "int4", "conv", "epilogue"])
    args = ap.parse_args(argv)
    caps = q.capabilities()
    print(f"kiln quantized kernels: {caps}; torch {torch.__version__}")
    if not caps["vnni"]:
        print("this CPU lacks AVX512-VNNI: nothing to measure")
        return
    old = torch.get_num_threads()
    try:
        for t in args.threads:
            torch.set_num_threads(t)
            with torch.no_grad():
                if "square" in args.only:
                    square(t, args.repeats, args.size)
                if "bert" in args.only:
                    bert(t, args.repeats)
                if "int4" in args.only:
                    int4(t, args.repeats)
                if "conv" in args.only:
                    conv(t, args.repeats)
                if "epilogue" in args.only:
                    epilogue(t, args.repeats)
    finally:
        torch.set_num_threads(old)


if __name__ == "__main__":
    main()
