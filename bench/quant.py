"""Quantization benchmarks (``python -m kiln.bench.quant``).

1. BERT-base-style classifier (``kiln.models.bert``): Kiln int8-dynamic vs Kiln float32 vs
   ONNX Runtime float32 and ONNX Runtime ``quantize_dynamic`` (int8) and OpenVINO after
   NNCF post-training quantization (``openvino_int8``), interleaved, per thread count.
2. ResNet-18: Kiln int8-static vs OpenVINO int8 (both calibrated on the same 10 seeded random
   images, as the weights are random) vs Kiln float32, with accuracy side by side: SQNR
   against float32 and top-1 agreement with eager float32 over 100 seeded inputs.
4. The LSTM forecaster: Kiln int8-dynamic vs OpenVINO int8 vs Kiln float32.
3. int8 GEMM 1024^3: every CPU kernel candidate for a QLINEAR_DYNAMIC and a static QLINEAR
   node (so kernels registered later show up) vs torch float32 GEMM.

Engines run in turn, rotating the order each round; medians and ratios are reported, with
each output's SQNR against the float32 engine (end-to-end agreement, not a timing).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first(out) -> torch.Tensor:
    if isinstance(out, (list, tuple)):
        out = out[0]
    return torch.as_tensor(out).float()


def _interleave(fns: dict, inputs, repeats: int) -> dict[str, float]:
    times = {e: [] for e in fns}
    order = list(fns)
    with torch.no_grad():
        for f in fns.values():
            f(*inputs)
            f(*inputs)
        for rep in range(repeats):
            for e in order[rep % len(order):] + order[:rep % len(order)]:
                t = time.perf_counter()
                fns[e](*inputs)
                times[e].append((time.perf_counter() - t) * 1e3)
    return {e: statistics.median(v) for e, v in times.items()}


def _onnx_sessions(model, inputs, threads: int) -> dict:
    """ONNX Runtime float32 and its ``quantize_dynamic`` int8 model (per-channel weights)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    d = tempfile.mkdtemp(prefix="kiln-bench-quant-")
    fp32, int8 = os.path.join(d, "model.onnx"), os.path.join(d, "model.int8.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, fp32, opset_version=17, dynamo=False)
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8, per_channel=True)
    out = {}
    for name, path in (("ort_fp32", fp32), ("ort_int8", int8)):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        out[name] = functools.partial(_ort_run, sess, names)
    return out


def _ort_run(sess, names, *args):
    return sess.run(None, {k: t.numpy() for k, t in zip(names, args)})[0]


def bench_bert(threads_list, repeats: int, layers: int, seq: int) -> dict:
    import kiln
    from kiln.ir import qformat as QF

    model, inputs = kiln.models.get("bert", layers=layers, seq=seq)
    res = {"model": f"bert layers={layers} seq={seq} batch=1", "threads": {}}
    for threads in threads_list:
        torch.set_num_threads(threads)
        _log(f"bert: compiling ({threads} thread(s))")
        t = time.perf_counter()
        fp = kiln.compile(model, inputs)
        t_fp = time.perf_counter() - t
        t = time.perf_counter()
        q = kiln.compile(model, inputs, quantize="int8-dynamic", calibration=[inputs])
        report = q.report.quantization
        t_q = time.perf_counter() - t
        fns = {"kiln_fp32": fp, "kiln_int8": q, **_onnx_sessions(model, inputs, threads),
               **_openvino_int8(model, inputs, threads, "bert")}
        with torch.no_grad():
            ref = _first(fp(*inputs))
            sqnr = {e: QF.sqnr_db(ref, _first(f(*inputs))) for e, f in fns.items()}
        med = _interleave(fns, inputs, repeats)
        res["threads"][str(threads)] = {
            "median_ms": med, "sqnr_db_vs_kiln_fp32": sqnr, "compile_s": {"kiln_fp32": t_fp, "kiln_int8": t_q},
            "layers_quantized": f"{sum(d.quantized for d in report)}/{len(report)}",
            "kiln_int8_vs_kiln_fp32": med["kiln_fp32"] / med["kiln_int8"],
            "kiln_int8_vs_ort_int8": med["ort_int8"] / med["kiln_int8"],
            "kiln_int8_vs_openvino_int8": med["openvino_int8"] / med["kiln_int8"] if "openvino_int8" in med else None}
    return res


def _openvino_int8(model, inputs, threads: int, name: str, calibration=None) -> dict:
    """{"openvino_int8": run} (NNCF post-training quantization), or {} where OpenVINO or NNCF
    cannot take the model (reported on stderr, not fatal)."""
    from kiln.bench import peers

    try:
        return {"openvino_int8": peers.openvino_int8(model, inputs, threads, name, calibration)}
    except Exception as e:  # noqa: BLE001  (a peer that cannot run is reported, not fatal)
        _log(f"{name}: openvino_int8 failed: {type(e).__name__}: {e}")
        return {}


def top1_agreement(ref_fn, fn, inputs_list) -> float:
    """Fraction of the inputs on which ``fn``'s arg-max class matches ``ref_fn``'s."""
    with torch.no_grad():
        same = sum(int(_first(ref_fn(*x)).argmax()) == int(_first(fn(*x)).argmax()) for x in inputs_list)
    return same / len(inputs_list)


def sqnr_over(ref_fn, fn, inputs_list) -> float:
    """SQNR (dB) of ``fn`` against ``ref_fn`` over all the inputs' outputs together."""
    from kiln.ir import qformat as QF

    with torch.no_grad():
        ref = torch.cat([_first(ref_fn(*x)).reshape(-1) for x in inputs_list])
        out = torch.cat([_first(fn(*x)).reshape(-1) for x in inputs_list])
    return QF.sqnr_db(ref, out)


def bench_resnet(threads_list, repeats: int, image: int, agreement_inputs: int = 100) -> dict:
    import kiln
    from kiln.bench.peers import calibration_inputs

    model, inputs = kiln.models.get("resnet18", image=image)
    cal = calibration_inputs(inputs, seed=1)
    test = calibration_inputs(inputs, n=agreement_inputs, seed=2)  # seeded, disjoint from calibration
    res = {"model": f"resnet18 {image}x{image} batch=1", "threads": {}}
    for threads in threads_list:
        torch.set_num_threads(threads)
        _log(f"resnet18: compiling ({threads} thread(s))")
        fp = kiln.compile(model, inputs)
        t = time.perf_counter()
        q = kiln.compile(model, inputs, quantize="int8-static", calibration=cal)
        t_q = time.perf_counter() - t
        report = q.report.quantization
        fns = {"kiln_fp32": fp, "kiln_int8": q, **_openvino_int8(model, inputs, threads, "resnet18", cal)}
        _log(f"resnet18: accuracy over {len(test)} inputs")
        sqnr = {e: sqnr_over(model, f, test) for e, f in fns.items()}
        top1 = {e: 100 * top1_agreement(model, f, test) for e, f in fns.items()}
        med = _interleave(fns, inputs, repeats)
        res["threads"][str(threads)] = {
            "median_ms": med, "sqnr_db_vs_eager_fp32": sqnr, f"top1_agreement_pct_over_{len(test)}": top1,
            "compile_s_int8": t_q, "layers_quantized": f"{sum(d.quantized for d in report)}/{len(report)}",
            "kiln_int8_vs_kiln_fp32": med["kiln_fp32"] / med["kiln_int8"],
            "kiln_int8_vs_openvino_int8": med["openvino_int8"] / med["kiln_int8"] if "openvino_int8" in med else None}
    return res


def bench_lstm(threads_list, repeats: int, seq: int) -> dict:
    import kiln
    from kiln.ir import qformat as QF

    model, inputs = kiln.models.get("lstm", seq=seq)
    res = {"model": f"lstm 2x128 seq={seq} batch=32", "threads": {}}
    for threads in threads_list:
        torch.set_num_threads(threads)
        _log(f"lstm: compiling ({threads} thread(s))")
        fp = kiln.compile(model, inputs)
        q = kiln.compile(model, inputs, quantize="int8-dynamic")
        fns = {"kiln_fp32": fp, "kiln_int8": q, **_openvino_int8(model, inputs, threads, "lstm")}
        with torch.no_grad():
            ref = _first(model(*inputs))
            sqnr = {e: QF.sqnr_db(ref, _first(f(*inputs))) for e, f in fns.items()}
        med = _interleave(fns, inputs, repeats)
        res["threads"][str(threads)] = {
            "median_ms": med, "sqnr_db_vs_eager_fp32": sqnr,
            "kiln_int8_vs_kiln_fp32": med["kiln_fp32"] / med["kiln_int8"],
            "kiln_int8_vs_openvino_int8": med["openvino_int8"] / med["kiln_int8"] if "openvino_int8" in med else None}
    return res


def bench_gemm(threads_list, repeats: int, n: int = 1024) -> dict:
    """Every CPU candidate for int8 GEMM nodes of n^3 vs torch float32 (GFLOP/s)."""
    from kiln.ir import DType, GraphBuilder, OpKind
    from kiln.ir import attrs as A
    from kiln.ir import qformat as QF
    from kiln.kernels.registry import candidates

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, n, generator=g)
    w = torch.randn(n, n, generator=g)
    wq, ws = QF.quantize_weight_int8(w)
    xs, xzp = QF.per_tensor_qparams(float(x.min()), float(x.max()))
    xq = QF.quantize_tensor(x, xs, xzp)
    b = GraphBuilder()
    dyn = b.add(OpKind.QLINEAR_DYNAMIC, b.input("x", (n, n)), b.const(wq), b.const(ws))
    sta = b.add(OpKind.QLINEAR, b.input("xq", (n, n), DType.UINT8), b.const(wq), b.const(ws),
                attrs=A.QLinearAttrs(xs, xzp))
    graph = b.build([dyn, sta])
    res = {"shape": f"{n}x{n}x{n}", "threads": {}}
    flops = 2.0 * n ** 3
    for threads in threads_list:
        torch.set_num_threads(threads)
        fns = {"torch_fp32": lambda: torch.nn.functional.linear(x, w)}
        for node, arg in zip(graph.nodes, (x, xq)):
            consts = [graph.constants.get(v) for v in node.inputs]
            ins = [arg] + consts[1:]
            for k in candidates(node, "cpu"):
                if k.target == "reference":
                    continue  # float32 math over integer values: torch_fp32 is that, faster
                fns[f"{node.op.value}:{k.name}"] = functools.partial(k.bind(node, consts), ins, node.attrs)
        med = _interleave(fns, (), repeats)
        res["threads"][str(threads)] = {"median_ms": med,
                                        "gflops": {k: flops / (v * 1e-3) / 1e9 for k, v in med.items()}}
    return res


def markdown(results: dict) -> str:
    lines = []
    for key, r in results.items():
        lines.append(f"### {key}: {r.get('model') or r.get('shape')}")
        for th, row in r["threads"].items():
            lines.append(f"- {th} thread(s): " + ", ".join(f"{e} {v:.2f} ms" for e, v in row["median_ms"].items()))
            extra = {k: v for k, v in row.items() if k not in ("median_ms",)}
            for k, v in extra.items():
                if isinstance(v, dict):
                    v = ", ".join(f"{a} {b:.1f}" if isinstance(b, float) else f"{a} {b}" for a, b in v.items())
                elif isinstance(v, float):
                    v = f"{v:.2f}"
                lines.append(f"  - {k}: {v}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.bench.quant", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small configs and few repeats")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int)
    p.add_argument("--only", help="comma-separated subset of bert,resnet,lstm,gemm")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    repeats = a.repeats or (5 if a.quick else 30)
    only = set(a.only.split(",")) if a.only else {"bert", "resnet", "lstm", "gemm"}
    warnings.filterwarnings("ignore")
    results = {}
    if "gemm" in only:
        results["gemm"] = bench_gemm(threads, repeats, 256 if a.quick else 1024)
    if "bert" in only:
        results["bert"] = bench_bert(threads, repeats, 2 if a.quick else 12, 32 if a.quick else 128)
    if "resnet" in only:
        results["resnet18"] = bench_resnet(threads, repeats, 64 if a.quick else 224, 10 if a.quick else 100)
    if "lstm" in only:
        results["lstm"] = bench_lstm(threads, repeats, 24 if a.quick else 96)
    sys.stdout.write(markdown(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
