"""``kiln bench models``: end-to-end latency of the example models against the peers.

Engines, by precision (``PRECISION``):
- fp32: eager PyTorch, torch.compile (Inductor, with freezing), ONNX Runtime, OpenVINO
  (``INFERENCE_PRECISION_HINT`` f32), TVM Relax (default build, no tuning; skipped with
  --quick), Kiln;
- bf16: Inductor on bf16 weights, OpenVINO bf16, Kiln ``precision="bf16"``;
- int8: OpenVINO after NNCF post-training quantization, Kiln int8 (``KILN_INT8``: static for
  the CNNs, calibrated on the same seeded inputs as NNCF; dynamic for the rest), on a CPU
  with native bf16 (AMX-BF16 or AVX512-BF16) with ``precision="bf16"`` for what
  quantization leaves float, as OpenVINO runs its non-quantized ops in bf16 there by default.
The peers are built in ``bench/peers.py``. For each thread count the engines run interleaved
(one call each, in turn, ``repeats`` times, the order rotating), so machine noise hits all
of them alike; medians are reported with Kiln's ratio against the best peer of its own
precision. Every engine's output is checked against eager fp32 (max abs error, SQNR in dB).
bf16 and int8 engines also show their rate as a fraction of the measured AMX ceiling
(``kiln.bench.machine.amx_ceilings``): the model's GEMM-like FLOPs over its time.
"""
from __future__ import annotations

import io
import json
import math
import statistics
import time
import warnings

import torch

from kiln.demo import first_tensor
from kiln.kernels.timing import interleaved

ENGINES = ("eager", "inductor", "onnxruntime", "openvino", "tvm", "kiln", "inductor_bf16", "openvino_bf16",
           "kiln_bf16", "openvino_int8", "kiln_int8", "kiln_nocodegen")
# kiln_nocodegen: Kiln with generated (TVM) group kernels off, to see what they add; not run by default
DEFAULT_ENGINES = ENGINES[:-1]
PRECISION = {e: "bf16" if e.endswith("_bf16") else "int8" if e.endswith("_int8") else "fp32" for e in ENGINES}
KILN_ENGINE = {"fp32": "kiln", "bf16": "kiln_bf16", "int8": "kiln_int8"}
# Kiln's int8 scheme per model: static where activations chain through convolutions
KILN_INT8 = {"resnet18": "int8-static", "resnet50": "int8-static"}
# engines built once per process (they follow torch's thread count); the others bind theirs
_THREAD_FREE = {"inductor", "inductor_bf16", "kiln", "kiln_bf16", "kiln_int8", "kiln_nocodegen"}


def _inductor(model, inputs):
    import torch._inductor.config as cfg

    cfg.freezing = True
    torch._dynamo.reset()
    fn = torch.compile(model)
    with torch.no_grad():
        fn(*inputs)  # compile happens on the first call
    return lambda *a: fn(*a)


def _onnxruntime(model, inputs, threads):
    import onnxruntime as ort

    f = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs, f, opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # ORT's pool threads spin after each run by default, stealing the core from whichever
    # engine runs next in the interleaved loop; a benchmark must not let one engine tax another
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(f.getvalue(), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return lambda *a: sess.run(None, {n: t.numpy() for n, t in zip(names, a)})[0]


def _tvm(model, inputs, threads):
    from kiln.options import configure_tvm_environment

    configure_tvm_environment(threads)
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(model, inputs)
    mod = from_exported_program(ep, keep_params_as_input=False)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "sapphirerapids", "num-cores": threads})
    ex = relax.build(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())

    def run(*a):
        out = vm["main"](*[tvm.runtime.tensor(t.numpy()) for t in a])
        while isinstance(out, (list, tuple)) or type(out).__name__ == "Array":
            out = out[0]
        return torch.from_numpy(out.numpy())
    return run


def _kiln(model, inputs, **options):
    import kiln

    t = time.perf_counter()
    fast = kiln.compile(model, inputs, **options)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    kiln.compile(model, inputs, **options)
    warm = time.perf_counter() - t
    return fast, cold, warm


_COMPUTE_OPS = ("linear", "matmul", "conv2d", "attention", "lstm", "gru")


def gemm_flops(compiled) -> int:
    """FLOPs of the GEMM-like ops (linear, matmul, conv, attention, recurrences) in Kiln's
    optimized fp32 graph, convolutions counted as direct ones: the work no engine can skip
    at fp32 short of a fast algorithm (Kiln's Winograd convolutions are one)."""
    from kiln.ir.cost import node_flops

    graph = compiled.compiled[0].graph  # one specialization: every thread count has the same graph
    return sum(node_flops(n) for n in graph.nodes if n.op.value in _COMPUTE_OPS)


def _kiln_int8(name: str, model, inputs, calibration):
    from kiln import _C

    scheme = KILN_INT8.get(name, "int8-dynamic")
    extra = {"calibration": calibration} if scheme == "int8-static" else {}
    if _C.amx_bf16_supported() or _C.dot_bf16_supported():
        extra["precision"] = "bf16"
    return _kiln(model, inputs, quantize=scheme, **extra)[0]


def _build(e: str, name: str, model, inputs, threads: int, calibration):
    from kiln.bench import peers

    if e == "inductor":
        return _inductor(model, inputs)
    if e == "inductor_bf16":
        return peers.inductor_bf16(model, inputs)
    if e == "onnxruntime":
        return _onnxruntime(model, inputs, threads)
    if e == "openvino":
        return peers.openvino(model, inputs, threads, "f32")
    if e == "openvino_bf16":
        return peers.openvino(model, inputs, threads, "bf16")
    if e == "openvino_int8":
        return peers.openvino_int8(model, inputs, threads, name, calibration)
    if e == "tvm":
        return _tvm(model, inputs, threads)
    if e == "kiln_bf16":
        return _kiln(model, inputs, precision="bf16")[0]
    if e == "kiln_int8":
        return _kiln_int8(name, model, inputs, calibration)
    if e == "kiln_nocodegen":
        return _kiln(model, inputs, codegen=False)[0]
    raise ValueError(f"unknown engine {e!r}; known: {', '.join(ENGINES)}")


def _sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    noise = float(((out.float() - ref.float()) ** 2).sum())
    signal = float((ref.float() ** 2).sum())
    return float("inf") if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else float("-inf")


def bench_model(name: str, factory_kwargs: dict, engines, threads_list, repeats: int, log) -> dict:
    from kiln import models
    from kiln.bench.machine import amx_ceilings, measure
    from kiln.bench.peers import calibration_inputs

    model, inputs = models.get(name, **factory_kwargs)
    with torch.no_grad():
        ref = first_tensor(model(*inputs))
    calibration = calibration_inputs(inputs)
    result = {"model": name, "config": factory_kwargs, "threads": {}}
    if any(PRECISION.get(e) != "fp32" for e in engines) and "kiln" not in engines:
        # the FLOPs the AMX fractions divide by come from Kiln's fp32 graph
        result["gemm_gflop"] = gemm_flops(_kiln(model, inputs)[0]) / 1e9
    built: dict[str, object] = {}
    compile_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        fns = {"eager": model}
        for e in engines:
            if e == "eager":
                continue
            key = e if e in _THREAD_FREE else f"{e}@{threads}"
            if key not in built and e not in errors:
                log(f"{name}: building {e} ({threads} thread(s))")
                t = time.perf_counter()
                try:
                    if e == "kiln":
                        fast, cold, warm = _kiln(model, inputs)
                        built[key] = fast
                        compile_s["kiln_warm"] = warm
                        result["gemm_gflop"] = gemm_flops(fast) / 1e9
                    else:
                        built[key] = _build(e, name, model, inputs, threads, calibration)
                except Exception as ex:  # a peer that cannot run this model is reported, not fatal
                    errors[e] = f"{type(ex).__name__}: {str(ex).strip().splitlines()[0][:200] if str(ex).strip() else ''}"
                    continue
                compile_s.setdefault(e, time.perf_counter() - t)
            if key in built:
                fns[e] = built[key]
        times = {e: [] for e in fns}
        errs, sqnr = {}, {}
        with torch.no_grad():
            for e, f in fns.items():  # warm up, and check numerics
                try:
                    out = first_tensor(f(*inputs)).float()
                    errs[e] = float((out - ref.float()).abs().max())
                    sqnr[e] = _sqnr_db(ref, out)
                except Exception as ex:
                    errors[e] = f"{type(ex).__name__}: {ex}"
            for e in list(fns):
                if e in errors:
                    fns.pop(e)
                    times.pop(e)
            order = list(fns)
            # the order rotates each round so no engine always runs right after another
            timed = interleaved([lambda f=fns[e]: f(*inputs) for e in order], repeats, rotate=True)
            for e, t in zip(order, timed):
                times[e] = [x * 1e3 for x in t.samples]
        med = {e: statistics.median(v) for e, v in times.items() if v}
        # the fp32 compute floor: this model's GEMM FLOPs at the fp32 GEMM rate measured now
        # (a 1024^3 torch.mm), so the table shows how close every engine already is to it
        peak = measure(threads)["peak_gflops"]
        row = {"median_ms": med, "max_abs_err": errs, "sqnr_db": sqnr,
               "kiln_vs_eager": med["eager"] / med["kiln"] if "kiln" in med else None,
               "peak_gflops": peak,
               "fp32_floor_ms": result["gemm_gflop"] / peak * 1e3 if "gemm_gflop" in result else None}
        for prec, k in KILN_ENGINE.items():
            # Kiln against the best peer of the same precision
            peers = [med[e] for e in med if PRECISION.get(e) == prec and not e.startswith("kiln") and e != "eager"]
            row[f"{k}_vs_best_peer"] = min(peers) / med[k] if peers and k in med else None
        row["kiln_bf16_vs_eager"] = med["eager"] / med["kiln_bf16"] if "kiln_bf16" in med else None
        if "gemm_gflop" in result and any(PRECISION.get(e) != "fp32" for e in med):
            # reduced precision against the AMX ceiling measured now (GFLOP/s; int8 in GOP/s)
            amx = amx_ceilings(threads)
            row["amx_ceiling_gflops"] = amx
            row["fraction_of_amx"] = {
                e: result["gemm_gflop"] / (med[e] * 1e-3) / amx[PRECISION[e]]
                for e in med if PRECISION.get(e) in ("bf16", "int8") and amx.get(PRECISION[e])}
        result["threads"][str(threads)] = row
    result["compile_s"] = compile_s
    result["errors"] = errors
    return result


QUICK = {"resnet18": {"image": 64}, "bert": {"layers": 2, "seq": 32}, "lstm": {"seq": 24}}
FULL = {"resnet18": {}, "bert": {}, "lstm": {}}


def run(names=None, quick: bool = False, engines=None, threads=(1, 2), repeats: int | None = None) -> dict:
    import sys

    from kiln.progress import progress

    engines = list(engines or ([e for e in DEFAULT_ENGINES if e != "tvm"] if quick else DEFAULT_ENGINES))
    configs = QUICK if quick else FULL
    names = names or list(configs)
    repeats = repeats or (5 if quick else 20)
    results = []
    bar = progress(total=len(names), desc="models", unit="model")
    old_threads = torch.get_num_threads()
    try:
        for name in names:
            results.append(bench_model(name, configs.get(name, {}), engines, threads, repeats,
                                       lambda m: print(f"[kiln bench] {m}", file=sys.stderr) if not
                                       sys.stderr.isatty() else None))
            bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    return {"quick": quick, "engines": engines, "threads": list(threads), "repeats": repeats, "results": results}


def _x(v) -> str:
    return f"{v:.2f}x" if v else "—"


def markdown(res: dict) -> str:
    engines = res["engines"]
    reduced = [e for e in engines if PRECISION.get(e) in ("bf16", "int8")]
    lines = [f"Median latency in ms ({res['repeats']} interleaved runs per engine, the order rotating each round).",
             "",
             "fp32 floor: the model's GEMM/conv/attention/recurrence FLOPs at the fp32 GEMM rate measured in the",
             "same run (1024^3 torch.mm), counting convolutions as direct ones; no engine computing them directly",
             "can be much faster than it (Kiln's Winograd 3x3 convolutions do fewer multiplies, and can run under it).",
             "",
             "| model | threads | " + " | ".join(engines) + " | fp32 floor |",
             "|---|---|" + "---|" * len(engines) + "---|"]
    for r in res["results"]:
        for th, row in r["threads"].items():
            cells = [f"{row['median_ms'][e]:.2f}" if e in row["median_ms"] else "—" for e in engines]
            floor = f"{row['fp32_floor_ms']:.2f}" if row.get("fp32_floor_ms") else "—"
            lines.append(f"| {r['model']} | {th} | " + " | ".join(cells) + f" | {floor} |")
    lines += ["", "Kiln against the best peer of its own precision (speedup; above 1 is Kiln faster), and its",
              "max abs error against eager fp32:", "",
              "| model | threads | Kiln vs eager | fp32 vs best peer | fp32 max err | bf16 vs best peer |"
              " int8 vs best peer |", "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        for th, row in r["threads"].items():
            err = row["max_abs_err"].get("kiln")
            lines.append(f"| {r['model']} | {th} | {_x(row.get('kiln_vs_eager'))} | {_x(row.get('kiln_vs_best_peer'))} | "
                         + (f"{err:.1e}" if err is not None else "—")
                         + f" | {_x(row.get('kiln_bf16_vs_best_peer'))} | {_x(row.get('kiln_int8_vs_best_peer'))} |")
    if reduced:
        lines += ["", "Reduced precision: output SQNR against eager fp32 in dB (higher is closer), and the rate as a",
                  "fraction of the AMX ceiling measured in the same run (bf16: TDPBF16PS, int8: TDPBSSD; the model's",
                  "GEMM-like FLOPs over its time):", "",
                  "| model | threads | " + " | ".join(f"{e} SQNR" for e in reduced) + " | "
                  + " | ".join(f"{e} of AMX" for e in reduced) + " |",
                  "|---|---|" + "---|" * (2 * len(reduced))]
        for r in res["results"]:
            for th, row in r["threads"].items():
                sq = [f"{row['sqnr_db'][e]:.1f}" if e in row.get("sqnr_db", {}) else "—" for e in reduced]
                fr = [f"{row['fraction_of_amx'][e]:.0%}" if e in row.get("fraction_of_amx", {}) else "—"
                      for e in reduced]
                lines.append(f"| {r['model']} | {th} | " + " | ".join(sq + fr) + " |")
    lines += ["", "Compile time (s): " + "; ".join(
        f"{r['model']}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["compile_s"].items()) for r in res["results"]),
        "(kiln_warm: a second kiln.compile of the same model in the same process)"]
    errs = [(r["model"], e, m) for r in res["results"] for e, m in r["errors"].items()]
    if errs:
        lines += ["", "Engines that failed:"] + [f"- {m} / {e}: {msg}" for m, e, msg in errs]
    return "\n".join(lines) + "\n"


def save(res: dict, json_path: str | None, md_path: str | None) -> None:
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
    if md_path:
        with open(md_path, "w") as f:
            f.write(markdown(res))
