"""``kiln bench models``: end-to-end latency of the example models against the peers.

Engines: eager PyTorch, torch.compile (Inductor, with freezing), ONNX Runtime, TVM Relax
(default build, no tuning; skipped with --quick), Kiln, and Kiln with precision="bf16"
(compared with eager fp32; its max error is against the fp32 eager output). For each thread count the
engines run interleaved (one call each, in turn, ``repeats`` times), so machine noise
hits all of them alike; medians are reported with ratios against eager and against the
best peer. Every engine's output is checked against eager (max abs error).
"""
from __future__ import annotations

import io
import json
import statistics
import time
import warnings

import torch

from kiln.demo import first_tensor
from kiln.kernels.timing import interleaved

ENGINES = ("eager", "inductor", "onnxruntime", "tvm", "kiln", "kiln_bf16", "kiln_nocodegen")
# kiln_nocodegen: Kiln with generated (TVM) group kernels off, to see what they add; not run by default
DEFAULT_ENGINES = ENGINES[:-1]


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


def bench_model(name: str, factory_kwargs: dict, engines, threads_list, repeats: int, log) -> dict:
    from kiln import models
    from kiln.bench.machine import measure

    model, inputs = models.get(name, **factory_kwargs)
    with torch.no_grad():
        ref = first_tensor(model(*inputs))
    result = {"model": name, "config": factory_kwargs, "threads": {}}
    built: dict[str, object] = {}
    compile_s: dict[str, float] = {}
    errors: dict[str, str] = {}
    for threads in threads_list:
        torch.set_num_threads(threads)
        fns = {"eager": model}
        for e in engines:
            if e == "eager":
                continue
            key = e if e in ("inductor", "kiln", "kiln_bf16", "kiln_nocodegen") else f"{e}@{threads}"  # ORT/TVM bind threads
            if key not in built and e not in errors:
                log(f"{name}: building {e} ({threads} thread(s))")
                t = time.perf_counter()
                try:
                    if e == "inductor":
                        built[key] = _inductor(model, inputs)
                    elif e == "onnxruntime":
                        built[key] = _onnxruntime(model, inputs, threads)
                    elif e == "tvm":
                        built[key] = _tvm(model, inputs, threads)
                    elif e == "kiln":
                        fast, cold, warm = _kiln(model, inputs)
                        built[key] = fast
                        compile_s["kiln_warm"] = warm
                        result["gemm_gflop"] = gemm_flops(fast) / 1e9
                    elif e == "kiln_bf16":
                        built[key] = _kiln(model, inputs, precision="bf16")[0]
                    elif e == "kiln_nocodegen":
                        built[key] = _kiln(model, inputs, codegen=False)[0]
                except Exception as ex:  # a peer that cannot run this model is reported, not fatal
                    errors[e] = f"{type(ex).__name__}: {str(ex).strip().splitlines()[0][:200] if str(ex).strip() else ''}"
                    continue
                compile_s.setdefault(e, time.perf_counter() - t)
            if key in built:
                fns[e] = built[key]
        times = {e: [] for e in fns}
        errs = {}
        with torch.no_grad():
            for e, f in fns.items():  # warm up, and check numerics
                try:
                    out = first_tensor(f(*inputs))
                    errs[e] = float((out.float() - ref.float()).abs().max())
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
        peers = [med[e] for e in med if e not in ("eager", "kiln", "kiln_bf16", "kiln_nocodegen")]
        row = {"median_ms": med, "max_abs_err": errs,
               "kiln_bf16_vs_eager": med["eager"] / med["kiln_bf16"] if "kiln_bf16" in med else None,
               "kiln_vs_eager": med["eager"] / med["kiln"] if "kiln" in med else None,
               "kiln_vs_best_peer": (min(peers) / med["kiln"]) if peers and "kiln" in med else None,
               "peak_gflops": peak,
               "fp32_floor_ms": result["gemm_gflop"] / peak * 1e3 if "gemm_gflop" in result else None}
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


def markdown(res: dict) -> str:
    engines = res["engines"]
    lines = [f"Median latency in ms ({res['repeats']} interleaved runs per engine); ratios are speedups of Kiln.",
             "",
             "fp32 floor: the model's GEMM/conv/attention/recurrence FLOPs at the fp32 GEMM rate measured in the",
             "same run (1024^3 torch.mm), counting convolutions as direct ones; no engine computing them directly",
             "can be much faster than it (Kiln's Winograd 3x3 convolutions do fewer multiplies, and can run under it).",
             "",
             "| model | threads | " + " | ".join(engines) + " | fp32 floor | Kiln vs eager | Kiln vs best peer |"
             " Kiln max err | Kiln bf16 vs eager | bf16 max err |",
             "|---|---|" + "---|" * len(engines) + "---|---|---|---|---|---|"]
    for r in res["results"]:
        for th, row in r["threads"].items():
            cells = [f"{row['median_ms'][e]:.2f}" if e in row["median_ms"] else "—" for e in engines]
            ve = f"{row['kiln_vs_eager']:.2f}x" if row["kiln_vs_eager"] else "—"
            vp = f"{row['kiln_vs_best_peer']:.2f}x" if row["kiln_vs_best_peer"] else "—"
            err = row["max_abs_err"].get("kiln")
            vb = f"{row['kiln_bf16_vs_eager']:.2f}x" if row.get("kiln_bf16_vs_eager") else "—"
            eb = row["max_abs_err"].get("kiln_bf16")
            floor = f"{row['fp32_floor_ms']:.2f}" if row.get("fp32_floor_ms") else "—"
            lines.append(f"| {r['model']} | {th} | " + " | ".join(cells) + f" | {floor} | {ve} | {vp} | "
                         + (f"{err:.1e}" if err is not None else "—") + f" | {vb} | "
                         + (f"{eb:.1e}" if eb is not None else "—") + " |")
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
