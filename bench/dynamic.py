"""``kiln bench dynamic``: a stream of requests whose shapes change every call.

    python -m kiln.bench.dynamic [--models hf_bert,resnet18] [--requests 300] [--threads 1]
                                 [--engines eager,kiln_dynamic,kiln_static,inductor,onnxruntime]
    python -m kiln.bench.dynamic --per-length 16,64,128,384 [--models hf_bert] [--layers 12]

A seeded stream per model: Hugging Face BERT at batch 1 with sequence lengths drawn like real
text (mostly 16-128 tokens, a tail to 512), ResNet-18 with batch sizes 1-32, and (``--models
lstm``) the LSTM forecaster with 1-32 series of 24-192 steps. Each engine runs
the whole stream in a process of its own (so its peak RSS is its own): it is built on the
first request's inputs, then answers every request; every compile it needs along the way
(Kiln static: one per new shape) counts in the stream's total. Reported per engine: the
total stream time including compiles, p50 and p99 request latency, peak RSS (and its ratio
to the peak right after the build: what the stream added; with ``--ahead``, Kiln dynamic's
also to the peak of a process that loads Kiln's static plan for the stream's largest shape
and runs that shape: what serving every shape costs beyond serving the largest one), and the
largest output error against eager over the stream (checked on every 10th request, outside
the timings, against eager's outputs computed beforehand in the parent process: eager's own
buffers are in no engine's RSS).

Engines: ``eager``; ``kiln_dynamic`` (``dynamic=True``; the LSTM's batch and time dims
named); ``kiln_static`` (a plan per shape); ``inductor`` (``torch.compile(dynamic=True)``);
``onnxruntime`` (dynamic axes); ``openvino`` (dynamic shapes; when installed). Times from
different processes are compared within one run of this command only; ``--interleave`` runs
every engine in one process instead, each request sent to all engines in turn, so that a
shared machine's load falls on all of them alike (then no per-engine peak RSS).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from kiln.bench.memory import peak_rss_mb
from kiln.options import child_environment, settings

ENGINES = ("eager", "kiln_dynamic", "kiln_static", "inductor", "onnxruntime", "openvino")


def stream(model: str, n: int, seed: int = 0, quick: bool = False) -> list[tuple[int, int]]:
    """(batch, length) per request: BERT lengths mostly 16-128 with a tail to 512; ResNet
    batches 1-32 (the length is the image side, fixed); the LSTM forecaster a batch of 1-32
    series of 24-192 steps each."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if model == "lstm":
            out.append((rng.randint(1, 8 if quick else 32), rng.randint(8, 24) if quick else rng.randint(24, 192)))
        elif model == "resnet18":
            out.append((rng.randint(1, 8 if quick else 32), 64 if quick else 224))
        else:
            common, top = (48, 64) if quick else (128, 512)
            seq = rng.randint(16, common) if rng.random() < 0.9 else rng.randint(common + 1, top)
            out.append((1, seq))
    return out


def _model(name: str, quick: bool):
    import kiln

    if name == "resnet18":
        return kiln.models.resnet18(image=64 if quick else 224, num_classes=10 if quick else 1000)
    if name == "lstm":
        return kiln.models.lstm(hidden=32 if quick else 128)
    small = dict(layers=2, hidden=64, heads=4, ffn=128, vocab=1000) if quick else {}
    return getattr(kiln.models, name)(**small)


def _inputs(name: str, batch: int, length: int, example):
    """A request's inputs: the same values in every process for the same shape (the
    reference outputs are computed in another process than the engine's)."""
    import torch

    g = torch.Generator().manual_seed(batch * 1009 + length)
    if name == "resnet18":
        return (torch.randn(batch, 3, length, length, generator=g),)
    if name == "lstm":
        return (torch.randn(batch, length, example[0].shape[-1], generator=g),)
    return (torch.randint(0, 1000, (batch, length), generator=g), torch.ones(batch, length, dtype=example[1].dtype))


def _names_axes(name: str):
    names = ["x"] if name in ("resnet18", "lstm") else ["input_ids", "attention_mask"]
    axes = {"x": {0: "batch"}} if name == "resnet18" else {n: {0: "batch", 1: "seq"} for n in names}
    return names, axes


def _kiln_dynamic(name: str):
    """Kiln's ``dynamic=``: True (batch, and the sequence of token inputs), or for the LSTM's
    float series the batch and the time dims named."""
    return {0: {0: "batch", 1: "seq"}} if name == "lstm" else True


def largest_request(name: str, n: int, quick: bool) -> tuple[int, int]:
    """The stream's largest shape: its largest batch and its longest length."""
    reqs = stream(name, n, quick=quick)
    return max(b for b, _ in reqs), max(s for _, s in reqs)


def prepare_ahead(name: str, quick: bool, precision: str, folder: str, n: int) -> None:
    """The ahead-of-time work of ``--ahead``, in a process of its own (so none of its state
    helps the stream's): Kiln's dynamic plan compiled on the stream's first request and saved
    (``kiln.save``), a static plan for the stream's largest shape saved beside it (the memory
    reference: what serving that one shape holds), and the model exported to ONNX with
    dynamic axes, all into ``folder``."""
    import torch

    import kiln

    model, example = _model(name, quick)
    first = _inputs(name, *stream(name, 1, quick=quick)[0], example)
    prec = {"precision": "bf16"} if precision == "bf16" else {}
    with torch.no_grad():
        compiled = kiln.compile(model, first, dynamic=_kiln_dynamic(name), **prec)
        kiln.save(compiled, os.path.join(folder, f"{name}.kiln"))
        del compiled
        largest = kiln.compile(model, _inputs(name, *largest_request(name, n, quick), example), **prec)
        kiln.save(largest, os.path.join(folder, f"{name}.largest.kiln"))
        del largest
        names, axes = _names_axes(name)
        torch.onnx.export(model, first, os.path.join(folder, f"{name}.onnx"), input_names=names, dynamic_axes=axes,
                          opset_version=17, dynamo=False)


def _build(engine: str, model, example, name: str, precision: str = "fp32", ahead: str | None = None):
    """The engine's callable. bf16: Kiln compiles the fp32 model with ``precision="bf16"``;
    eager and Inductor run a bf16 copy of the model (floating inputs cast to bf16); OpenVINO
    takes the bf16 inference hint; ONNX Runtime has no bf16 CPU path (refused).
    ``ahead``: the folder of ``prepare_ahead``'s files -- Kiln dynamic loads its artifact
    (``kiln.load``), ONNX Runtime and OpenVINO start from the ONNX file (session creation and
    ``compile_model`` still count); Kiln static has no ahead form (a plan per shape, refused)."""
    import copy

    import torch

    bf16 = precision == "bf16"
    if ahead is not None and engine == "kiln_static":
        raise RuntimeError("Kiln static compiles a plan per shape: no ahead-of-time form")
    if ahead is not None and engine == "kiln_dynamic":
        import kiln

        return kiln.load(os.path.join(ahead, f"{name}.kiln"))
    if engine in ("eager", "inductor") and bf16:
        low = copy.deepcopy(model).to(torch.bfloat16)
        fn = low if engine == "eager" else torch.compile(low, dynamic=True)
        return lambda *a: fn(*(x.to(torch.bfloat16) if x.is_floating_point() else x for x in a))
    if engine == "eager":
        return model
    if engine in ("kiln_dynamic", "kiln_static"):
        import kiln

        dyn = {"dynamic": _kiln_dynamic(name)} if engine == "kiln_dynamic" else {}
        return kiln.compile(model, example, **dyn, **({"precision": "bf16"} if bf16 else {}))
    if engine == "inductor":
        fn = torch.compile(model, dynamic=True)
        return lambda *a: fn(*a)
    if engine == "onnxruntime" and bf16:
        raise RuntimeError("ONNX Runtime has no bf16 execution on CPU")
    names, axes = _names_axes(name)
    if ahead is not None:
        with open(os.path.join(ahead, f"{name}.onnx"), "rb") as fh:
            onnx_bytes = fh.read()
    else:
        import io

        f = io.BytesIO()
        torch.onnx.export(model, example, f, input_names=names, dynamic_axes=axes, opset_version=17, dynamo=False)
        onnx_bytes = f.getvalue()
    if engine == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        if settings().omp_passive:  # the wait policy torch's OpenMP workers run under (--no-spin)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        return lambda *a: torch.from_numpy(sess.run(None, {n: t.numpy() for n, t in zip(names, a)})[0])
    import openvino as ov  # its TBB workers are left as they are, --no-spin or not

    core = ov.Core()
    compiled = core.compile_model(core.read_model(onnx_bytes), "CPU",
                                  {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                   "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"})
    return lambda *a: torch.from_numpy(compiled(list(t.numpy() for t in a))[0])


def largest_rss(name: str, n: int, threads: int, quick: bool, folder: str) -> dict:
    """The memory reference, in a process of its own: the static plan for the stream's largest
    shape loaded and called three times on it; the process's peak RSS."""
    import torch

    import kiln

    torch.set_num_threads(threads)
    _, example = _model(name, quick)
    args = _inputs(name, *largest_request(name, n, quick), example)
    fn = kiln.load(os.path.join(folder, f"{name}.largest.kiln"))
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
    return {"largest_shape": list(largest_request(name, n, quick)),
            "largest_rss_mb": peak_rss_mb()}


def write_references(name: str, n: int, quick: bool, path: str) -> None:
    """Eager fp32's outputs for every 10th request of the stream (the accuracy check), saved
    to ``path``: each engine's process reads them instead of running eager itself, whose
    buffers (a batch of 32 in fp32) would otherwise count in that engine's peak RSS."""
    import torch

    model, example = _model(name, quick)
    refs = {}
    with torch.no_grad():
        for i, (b, s) in enumerate(stream(name, n, quick=quick)):
            if i % 10 == 0:
                refs[str(i)] = _first(model(*_inputs(name, b, s, example))).float().contiguous()
    torch.save(refs, path)


def _first(out):
    import torch

    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def run_engine(engine: str, name: str, n: int, threads: int, quick: bool, precision: str = "fp32",
               ahead: str | None = None, references: str | None = None) -> dict:
    """The whole stream on one engine, in this process; checked against the eager outputs in
    ``references`` (``write_references``), or against eager run here when there are none."""
    import torch

    torch.set_num_threads(threads)
    refs = torch.load(references, weights_only=True) if references else None
    model, example = _model(name, quick)
    reqs = stream(name, n, quick=quick)
    first = _inputs(name, *reqs[0], example)
    t0 = time.perf_counter()
    with torch.no_grad():
        fn = _build(engine, model, first, name, precision, ahead)
        build_s = time.perf_counter() - t0
        rss_built = peak_rss_mb()  # peak so far: the build's
        lat, err, checking = [], 0.0, 0.0
        for i, (b, s) in enumerate(reqs):
            args = _inputs(name, b, s, example)
            t = time.perf_counter()
            out = _first(fn(*args))
            lat.append(time.perf_counter() - t)
            if i % 10 == 0:  # the check against eager is not the engine's time: kept out of the total
                t = time.perf_counter()
                want = refs[str(i)] if refs is not None else _first(model(*args)).float()
                err = max(err, float((out.float() - want).abs().max()))
                checking += time.perf_counter() - t
    total = time.perf_counter() - t0 - checking
    rss_mb = peak_rss_mb()
    return {"engine": engine, "model": name, "threads": threads, "requests": n, "build_s": build_s,
            "total_s": total, "p50_ms": statistics.median(lat) * 1e3, "precision": precision,
            "p99_ms": sorted(lat)[max(0, int(len(lat) * 0.99) - 1)] * 1e3, "peak_rss_mb": rss_mb,
            "build_rss_mb": rss_built,
            "max_abs_err": err}


def run_interleaved(engines: list[str], name: str, n: int, threads: int, quick: bool,
                    precision: str = "fp32", ahead: str | None = None) -> list[dict]:
    """Every engine in this one process, the stream's requests sent to each in turn (the
    order rotating per request): the machine's load at any moment falls on all engines alike,
    which separate processes run one after another cannot promise on a shared machine. Each
    engine's total is its build plus its own requests' time; no per-engine peak RSS."""
    import torch

    torch.set_num_threads(threads)
    model, example = _model(name, quick)
    reqs = stream(name, n, quick=quick)
    first = _inputs(name, *reqs[0], example)
    fns, build, failed = {}, {}, []
    with torch.no_grad():
        for e in list(engines):
            t = time.perf_counter()
            try:
                fns[e] = _build(e, model, first, name, precision, ahead)
            except Exception as ex:  # noqa: BLE001  (an engine that cannot run this: its row says why)
                failed.append({"engine": e, "model": name, "threads": threads, "error": f"{type(ex).__name__}: {ex}"[:200]})
                continue
            build[e] = time.perf_counter() - t
        engines = [e for e in engines if e in fns]
        lat, err = {e: [] for e in engines}, {e: 0.0 for e in engines}
        for i, (b, s) in enumerate(reqs):
            args = _inputs(name, b, s, example)
            want = _first(model(*args)).float() if i % 10 == 0 else None
            for e in engines[i % len(engines):] + engines[:i % len(engines)]:
                t = time.perf_counter()
                out = _first(fns[e](*args))
                lat[e].append(time.perf_counter() - t)
                if want is not None:
                    err[e] = max(err[e], float((out.float() - want).abs().max()))
    return [{"engine": e, "model": name, "threads": threads, "requests": n, "build_s": build[e],
             "total_s": build[e] + sum(lat[e]), "p50_ms": statistics.median(lat[e]) * 1e3,
             "p99_ms": sorted(lat[e])[max(0, int(len(lat[e]) * 0.99) - 1)] * 1e3, "peak_rss_mb": None,
             "max_abs_err": err[e], "precision": precision} for e in engines] + failed


def per_length(name: str, sizes: list[int], threads: int, quick: bool, layers: int | None, rounds: int) -> list:
    """Steady-state latency of one ``dynamic=True`` plan against the static plan compiled for
    each size (the issue's "within 10% of the static plan" target), and eager, timed in
    interleaved rounds in this one process (ratios are what mean anything on a shared
    machine). ``sizes``: sequence lengths (BERT and the LSTM, batch 1) or batch sizes (ResNet-18). The
    dynamic plan is compiled at the middle size with the default size buckets, and once more
    with ``size_buckets=1`` (one kernel choice per node): what choosing per size bucket adds."""
    import torch

    import kiln
    from kiln.kernels.timing import interleaved

    torch.set_num_threads(threads)
    if layers is not None and name in ("hf_bert", "bert"):  # (--layers: the BERT models' depth)
        model, example = getattr(kiln.models, name)(layers=layers)
    else:
        model, example = _model(name, quick)
    shape = (lambda s: (s, 64 if quick else 224)) if name == "resnet18" else (lambda s: (1, s))
    mid = sizes[len(sizes) // 2]
    with torch.no_grad():
        t = time.perf_counter()
        dyn = kiln.compile(model, _inputs(name, *shape(mid), example), dynamic=_kiln_dynamic(name))
        dyn_s = time.perf_counter() - t
        t = time.perf_counter()
        one = kiln.compile(model, _inputs(name, *shape(mid), example), dynamic=_kiln_dynamic(name), size_buckets=1)
        one_s = time.perf_counter() - t
        by_size = sum(k.startswith("by-size[") for _, k in dyn.report.node_kernels)
        rows = []
        for s in sizes:
            args = _inputs(name, *shape(s), example)
            static = kiln.compile(model, args)
            want = _first(model(*args))
            err = max(float((_first(f(*args)).float() - want.float()).abs().max()) for f in (dyn, static, one))
            r = interleaved([lambda: dyn(*args), lambda: static(*args), lambda: model(*args), lambda: one(*args)],
                            rounds, warmup=2, rotate=True)
            rows.append({"model": name, "size": s, "threads": threads, "dynamic_ms": r[0].median * 1e3,
                         "static_ms": r[1].median * 1e3, "eager_ms": r[2].median * 1e3, "one_choice_ms": r[3].median * 1e3,
                         "max_abs_err": err, "dynamic_compile_s": dyn_s, "one_choice_compile_s": one_s, "hint": mid,
                         "by_size_nodes": by_size})
    return rows


def print_per_length(rows: list) -> None:
    print("| model | size | threads | dynamic ms | static ms | dynamic / static | one choice ms | one choice / static "
          "| eager ms | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['size']} | {r['threads']} | {r['dynamic_ms']:.2f} | {r['static_ms']:.2f} | "
              f"{r['dynamic_ms'] / r['static_ms']:.2f} | {r['one_choice_ms']:.2f} | "
              f"{r['one_choice_ms'] / r['static_ms']:.2f} | {r['eager_ms']:.2f} | {r['max_abs_err']:.1e} |")
    for key in sorted({(r["model"], r["threads"]) for r in rows}):
        r = next(r for r in rows if (r["model"], r["threads"]) == key)
        print(f"{key[0]} @{key[1]} thread(s): dynamic plan compiled at {r['hint']} in {r['dynamic_compile_s']:.1f} s "
              f"({r['by_size_nodes']} node(s) dispatched by size); with size_buckets=1 in {r['one_choice_compile_s']:.1f} s "
              f"(after it: the example size's choices come from the process's memo)")


def _against_peers(rows: list) -> list[str]:
    """Kiln dynamic's total and p50 against the best other engine's, per model and threads."""
    out = []
    ok = [r for r in rows if "error" not in r]
    for key in sorted({(r["model"], r["threads"]) for r in ok}):
        mine = [r for r in ok if (r["model"], r["threads"]) == key and r["engine"] == "kiln_dynamic"]
        peers = [r for r in ok if (r["model"], r["threads"]) == key and r["engine"] not in ("kiln_dynamic", "kiln_static")]
        if not mine or not peers:
            continue
        best_total = min(peers, key=lambda r: r["total_s"])
        best_p50 = min(peers, key=lambda r: r["p50_ms"])
        eager = [r for r in peers if r["engine"] == "eager"]
        # the stream's sizes spread the latencies by themselves: eager's own p99/p50 is that
        # spread, so Kiln's ratio over eager's is what compiles or slow paths add to the tail
        tail = (f" (eager's {eager[0]['p99_ms'] / eager[0]['p50_ms']:.2f})" if eager else "")
        out.append(f"{key[0]} @{key[1]} thread(s): Kiln dynamic total {best_total['total_s'] / mine[0]['total_s']:.2f}x "
                   f"the best peer's ({best_total['engine']}), p50 {best_p50['p50_ms'] / mine[0]['p50_ms']:.2f}x "
                   f"({best_p50['engine']}); p99/p50 {mine[0]['p99_ms'] / mine[0]['p50_ms']:.2f}{tail}")
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", default="hf_bert,resnet18")
    ap.add_argument("--engines", default="eager,kiln_dynamic,kiln_static,inductor,onnxruntime,openvino")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--threads", default="1", help="thread counts, e.g. 1,2")
    ap.add_argument("--quick", action="store_true", help="small models and 20 requests (CI)")
    ap.add_argument("--per-length", metavar="SIZES",
                    help="instead of the stream: one dynamic plan against a static plan per size, interleaved")
    ap.add_argument("--layers", type=int, help="--per-length: encoder layers of the BERT model")
    ap.add_argument("--rounds", type=int, default=15, help="--per-length: timing rounds")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: Kiln precision='bf16', eager/Inductor on bf16 weights, OpenVINO's bf16 hint")
    ap.add_argument("--interleave", action="store_true",
                    help="all engines in one process, each request sent to every engine in turn (no per-engine RSS)")
    ap.add_argument("--no-spin", action="store_true",
                    help="idle worker threads sleep instead of spinning: OMP_WAIT_POLICY=PASSIVE for torch's "
                         "OpenMP workers (eager, Inductor, Kiln) and allow_spinning=0 for ONNX Runtime's pool "
                         "(the command runs again in a new process: OpenMP reads the policy when it loads)")
    ap.add_argument("--ahead", action="store_true",
                    help="ahead-of-time work before the stream, outside its total (in a process of its own): "
                         "Kiln dynamic compiles and saves an artifact, which the stream's build loads (kiln.load); "
                         "ONNX Runtime and OpenVINO start from an exported ONNX file")
    ap.add_argument("--cold", action="store_true",
                    help="Kiln's caches (compile, import, generated modules, tuning database) start empty: "
                         "a fresh KILN_CACHE_DIR (default: the caches as found)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--ahead-dir", help=argparse.SUPPRESS)
    ap.add_argument("--ahead-child", help=argparse.SUPPRESS)
    ap.add_argument("--largest-child", help=argparse.SUPPRESS)
    ap.add_argument("--references", help=argparse.SUPPRESS)
    ap.add_argument("--namespace", help=argparse.SUPPRESS)  # --no-spin's new process: the parsed arguments


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    if args.namespace:
        args = argparse.Namespace(**json.loads(args.namespace))
    return main_with(args)


def _again(args, env: dict, **more) -> int:
    """This command run again in a new process with ``env`` set (and ``more`` arguments)."""
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    mine = {a.dest for a in ap._actions} - {"help", "namespace"}  # (the CLI's namespace holds more)
    cmd = [sys.executable, "-m", "kiln.bench.dynamic", "--namespace",
           json.dumps({**{k: v for k, v in vars(args).items() if k in mine}, **more})]
    return subprocess.run(cmd, env=child_environment(**env)).returncode


def main_with(args) -> int:
    if getattr(args, "no_spin", False) and not settings().omp_passive:
        # OpenMP has read its wait policy already (torch loaded it): only a new process changes it
        return _again(args, {"OMP_WAIT_POLICY": "PASSIVE"})
    n = 20 if args.quick else args.requests
    load_start = os.getloadavg()[0]
    if args.per_length:
        sizes = [int(x) for x in args.per_length.split(",")]
        rows = [r for name in args.models.split(",") for t in args.threads.split(",")
                for r in per_length(name, sizes, int(t), args.quick, args.layers, args.rounds)]
        print_per_length(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.ahead_child:
        folder, name = args.ahead_child.rsplit(":", 1)
        prepare_ahead(name, args.quick, args.precision, folder, n)
        return 0
    if args.largest_child:
        folder, name, threads = args.largest_child.rsplit(":", 2)
        print(json.dumps(largest_rss(name, n, int(threads), args.quick, folder)))
        return 0
    if args.child:
        engine, name, threads = args.child.split(":")
        print(json.dumps(run_engine(engine, name, n, int(threads), args.quick, args.precision, args.ahead_dir,
                                    getattr(args, "references", None))))
        return 0
    if args.cold and not getattr(args, "cold_dir", None):
        # every process of the run (this one too: --interleave compiles here) on empty caches
        cold = tempfile.mkdtemp(prefix="kiln-bench-cold-")
        try:
            return _again(args, {"KILN_CACHE_DIR": cold}, cold_dir=cold)
        finally:
            shutil.rmtree(cold, ignore_errors=True)
    engines = args.engines.split(",")
    for engine in engines:
        if engine not in ENGINES:
            raise SystemExit(f"unknown engine {engine!r}; engines: {', '.join(ENGINES)}")
    ahead_dir = tempfile.mkdtemp(prefix="kiln-bench-ahead-") if args.ahead else None
    refs_dir = tempfile.mkdtemp(prefix="kiln-bench-refs-")
    try:
        rows = _streams(args, engines, n, ahead_dir, refs_dir)
    finally:
        shutil.rmtree(refs_dir, ignore_errors=True)
        if ahead_dir is not None:
            shutil.rmtree(ahead_dir, ignore_errors=True)  # an artifact and an ONNX file per model
    _print_streams(args, rows, load_start)
    return 0


def _streams(args, engines: list[str], n: int, ahead_dir: str | None, refs_dir: str) -> list[dict]:
    """Every model's stream on every engine (after the ahead-of-time work of ``--ahead``)."""
    rows = []
    for name in args.models.split(","):
        refs = os.path.join(refs_dir, f"{name}.pt")
        if not args.interleave:  # here: the engines' processes then hold none of eager's buffers
            write_references(name, n, args.quick, refs)
        if ahead_dir is not None:
            print(f"[kiln bench dynamic] {name}: ahead of time (compile and save, ONNX export)", file=sys.stderr)
            cmd = [sys.executable, "-m", "kiln.bench.dynamic", "--ahead-child", f"{ahead_dir}:{name}",
                   "--precision", args.precision, "--requests", str(n)] + (["--quick"] if args.quick else [])
            subprocess.run(cmd, check=True, env=child_environment())
        for threads in (int(t) for t in args.threads.split(",")):
            if args.interleave:
                print(f"[kiln bench dynamic] {name}, {', '.join(engines)} interleaved, {threads} thread(s)",
                      file=sys.stderr)
                rows += run_interleaved(engines, name, n, threads, args.quick, args.precision, ahead_dir)
                continue
            for engine in engines:
                cmd = [sys.executable, "-m", "kiln.bench.dynamic", "--child", f"{engine}:{name}:{threads}",
                       "--requests", str(n), "--precision", args.precision] + (["--quick"] if args.quick else []) + \
                    (["--ahead-dir", ahead_dir] if ahead_dir else []) + ["--references", refs]
                print(f"[kiln bench dynamic] {name}, {engine}, {threads} thread(s)", file=sys.stderr)
                out = subprocess.run(cmd, capture_output=True, text=True, env=child_environment())
                if out.returncode != 0:
                    why = (out.stderr.strip().splitlines() or ["failed"])[-1][:200]
                    rows.append({"engine": engine, "model": name, "threads": threads, "error": why})
                    continue
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            if ahead_dir is not None and "kiln_dynamic" in engines and not args.interleave:
                _add_reference(rows, ahead_dir, name, n, threads, args.quick)
    return rows


def _add_reference(rows: list[dict], ahead_dir: str, name: str, n: int, threads: int, quick: bool) -> None:
    """The static plan for the stream's largest shape, loaded and run in its own process: its
    peak RSS beside Kiln dynamic's (what the stream held beyond serving that one shape)."""
    cmd = [sys.executable, "-m", "kiln.bench.dynamic", "--largest-child", f"{ahead_dir}:{name}:{threads}",
           "--requests", str(n)] + (["--quick"] if quick else [])
    print(f"[kiln bench dynamic] {name}, Kiln static at the stream's largest shape, {threads} thread(s)",
          file=sys.stderr)
    out = subprocess.run(cmd, capture_output=True, text=True, env=child_environment())
    if out.returncode != 0:
        return
    ref = json.loads(out.stdout.strip().splitlines()[-1])
    for r in rows:
        if r["model"] == name and r["threads"] == threads and r["engine"] == "kiln_dynamic" and "error" not in r:
            r.update(ref)


def _print_streams(args, rows: list[dict], load_start: float) -> None:
    print(f"precision: {args.precision}" + (" (max err against eager fp32)" if args.precision == "bf16" else ""))
    print("Kiln's caches: " + ("empty at the start (--cold)" if getattr(args, "cold_dir", None)
                               else f"as found ({settings().cache_dir})") +
          ("; ahead of time (--ahead, not in the totals): Kiln compiled and saved its artifact, the build column "
           "is kiln.load; ONNX Runtime and OpenVINO built from an exported ONNX file" if args.ahead else
           "; every build (compile, export) is in the totals"))
    print("idle workers: " + ("sleep (OMP_WAIT_POLICY=PASSIVE; ONNX Runtime allow_spinning=0)" if settings().omp_passive
                              else "spin for a while (the runtimes' defaults)") +
          f"; load average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end "
          f"({os.cpu_count()} CPUs)")
    print("| model | threads | engine | total s (incl. compiles) | build s | p50 ms | p99 ms | p99/p50 | peak RSS MB | max err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['threads']} | {r['engine']} | failed: {r['error']} |||||||")
            continue
        rss = "—" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
        if r.get("build_rss_mb"):  # how much the stream grew the process past its build
            rss += f" ({r['peak_rss_mb'] / r['build_rss_mb']:.2f}x build"
            if r.get("largest_rss_mb"):  # ... and past serving only the stream's largest shape
                rss += f", {r['peak_rss_mb'] / r['largest_rss_mb']:.2f}x largest"
            rss += ")"
        print(f"| {r['model']} | {r['threads']} | {r['engine']} | {r['total_s']:.1f} | {r['build_s']:.1f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['p99_ms'] / r['p50_ms']:.2f} | {rss} | "
              f"{r['max_abs_err']:.1e} |")
    for line in _against_peers(rows):
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
