"""``kiln bench suite``: the Hugging Face model suite, like PyTorch's CPU dashboard.

For each model of ``bench/suite_models.py`` (random weights, batch 1) and each precision:

* **pass**: Kiln's outputs (every tensor of the model's output structure) against eager's,
  max abs error within ``1e-4`` of each output's scale (its max abs value) in fp32; in
  bf16, PyTorch's benchmark rule: on every output, Kiln's RMSE against a float64 run at
  most 3x eager bf16's own RMSE against it, plus 1e-4, pooled over four seeded draws of
  inputs (``bench/suite_check.py``);
* **fallbacks**: the ATen ops that run in PyTorch (``compiled.report.fallbacks``) by name
  and count;
* **compile**: Kiln's cold compile (empty caches), its warm compile in a new process (the
  caches the cold one filled), Inductor's cold compile (``torch.compile`` with freezing,
  its caches off, first call);
* **memory**: the process's peak RSS after building the model and running it eagerly, and
  after Kiln's compile (``VmHWM``: the compile's peak, since it runs next);
* **latency**: eager, Inductor and Kiln medians, timed interleaved in one process
  (``kernels.timing.interleaved``, the order rotating each round) at each thread count.

Each model runs in its own process (a fresh peak RSS, fresh caches, a crash or an
out-of-memory kill costs one row); ``--quick`` runs tiny configs in this process and checks
correctness only (CI). Results: a markdown table, JSON, a PNG bar chart of speedups, and a
summary line per suite (pass rate, geomean speedups, geomean compile times).

    python -m kiln.bench.suite [--only bert,resnet] [--precision fp32,bf16] [--threads 1,2]
                               [--quick] [--json F] [--markdown F] [--plot F.png]
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from kiln.bench import suite_models
from kiln.bench.memory import peak_rss_mb
from kiln.frontends.hf_outputs import register_output_pytrees
from kiln.bench.suite_check import (BF16_DRAWS, TOL_FP32, bf16_check, bf16_check_draws, compare, fp64_outputs,
                                    tensor_leaves)
from kiln.bench.suite_report import add_arguments, markdown, plot, summarize


# ----------------------------------------------------------------------------- helpers
def _cast_inputs(inputs, dtype):
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}"


# ----------------------------------------------------------------------------- one model
def _inductor(model, inputs):
    import torch._inductor.config as cfg

    cfg.freezing = True
    cfg.fx_graph_cache = False
    cfg.autotune_local_cache = False
    torch._dynamo.reset()
    fn = torch.compile(model)
    t = time.perf_counter()
    with torch.no_grad():
        fn(*inputs)  # compiles on the first call
    return fn, time.perf_counter() - t


def run_model(name: str, precision: str = "fp32", threads=(1,), quick: bool = False, repeats: int = 20,
              inductor: bool = True, timing: bool = True, log=lambda m: None) -> dict:
    """Build, check, compile and time one model at one precision; never raises."""
    import kiln

    spec = suite_models.BY_NAME[name]
    row = {"model": name, "suite": spec.suite, "cls": spec.cls, "precision": precision, "status": "error",
           "fallbacks": {}, "compile_s": {}, "latency_ms": {}, "errors": {}}
    try:
        torch.set_num_threads(threads[0])
        model, inputs = suite_models.build(name, quick=quick)
        # Before the first eager call: a decoder's cache then flattens into its tensors in
        # eager's outputs too. Otherwise it is one opaque leaf until Kiln's compile registers
        # it, and eager bf16's error (the bf16 bound) would cover the logits alone while
        # Kiln's covers the cache as well.
        register_output_pytrees(model)
        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
        row["inputs"] = [list(x.shape) for x in inputs]
        with torch.no_grad():
            ref = model(*inputs)
        row["output_tensors"] = len(tensor_leaves(ref))
        row["rss_mb"] = {"eager_peak": peak_rss_mb()}
        peer_model, peer_inputs, peer_ref = model, inputs, ref
        options = {}
        if precision == "bf16":
            options["precision"] = "bf16"
            peer_model = copy.deepcopy(model).to(torch.bfloat16)
            peer_inputs = _cast_inputs(inputs, torch.bfloat16)
            with torch.no_grad():
                peer_ref = peer_model(*peer_inputs)
            row["eager_bf16_rel"] = compare(peer_ref, ref)["rel"]
        log(f"{name} {precision}: compiling with Kiln")
        import torch._dynamo as _dynamo  # noqa: F401  (torch.export imports it; Inductor's timer starts after it too)
        t = time.perf_counter()
        try:
            fast = kiln.compile(model, inputs, **options)
        except Exception as e:  # noqa: BLE001  (a model that does not compile is a failed row)
            row["error"] = _short(e)
            return row
        row["compile_s"]["kiln_cold"] = time.perf_counter() - t
        row["rss_mb"]["kiln_compile_peak"] = peak_rss_mb()
        fb = collections.Counter(op for op, _scope, _why in fast.report.fallbacks)
        row["fallbacks"] = dict(fb.most_common())
        row["fallback_nodes"] = sum(fb.values())
        with torch.no_grad():
            got = fast(*inputs)
        cmp = compare(got, ref)
        row.update(max_err=cmp["err"], scale=cmp["scale"], rel_err=cmp["rel"])
        if "why" in cmp:
            row["error"] = cmp["why"]
        if precision == "fp32":
            row["tolerance"] = TOL_FP32
            row["status"] = "pass" if cmp["rel"] <= TOL_FP32 else "fail"
        else:
            # after Kiln's compile and its peak RSS: the float64 copy of the model must not
            # count in the compile's memory
            draws = [inputs] + [suite_models.inputs(name, quick, seed) for seed in range(1, BF16_DRAWS)]
            with torch.no_grad():
                gots = [got] + [fast(*d) for d in draws[1:]]
                eagers = [peer_ref] + [peer_model(*_cast_inputs(d, torch.bfloat16)) for d in draws[1:]]
                ref64 = fp64_outputs(model, draws)
                refs = ref64 if ref64 is not None else [ref] + [model(*d) for d in draws[1:]]
            check = bf16_check_draws(gots, eagers, refs)
            check["reference"] = "fp32" if ref64 is None else "fp64"
            del ref64, refs, gots, eagers
            row["bf16_check"] = check
            row["tolerance"] = {"multiplier": check.get("multiplier"), "tol": check.get("tol")}
            row["status"] = "pass" if check["pass"] and "why" not in cmp else "fail"
            if check.get("why"):
                row["error"] = check["why"]
        fns = {"eager": lambda: peer_model(*peer_inputs), "kiln": lambda: fast(*inputs)}
        if inductor:
            log(f"{name} {precision}: compiling with Inductor")
            try:
                ind, secs = _inductor(peer_model, peer_inputs)
                row["compile_s"]["inductor"] = secs
                fns["inductor"] = lambda: ind(*peer_inputs)
            except Exception as e:  # noqa: BLE001  (a peer that fails is reported, not fatal)
                row["errors"]["inductor"] = _short(e)
        if timing:
            from kiln.kernels.timing import interleaved

            for th in threads:
                torch.set_num_threads(th)
                order = list(fns)
                log(f"{name} {precision}: timing {', '.join(order)} at {th} thread(s)")
                res = interleaved([fns[e] for e in order], repeats, warmup=2, rotate=True)
                row["latency_ms"][str(th)] = {e: t.median * 1e3 for e, t in zip(order, res) if t.samples}
    except Exception as e:  # noqa: BLE001
        row["error"] = _short(e)
        row["traceback"] = traceback.format_exc(limit=8)
    return row


def warm_compile(name: str, precision: str, threads: int) -> dict:
    """Kiln's compile time with the caches a cold compile filled (run in a new process)."""
    import kiln

    torch.set_num_threads(threads)
    model, inputs = suite_models.build(name)
    # the model runs once first, as in the cold worker: a model's first call can change its
    # state (transformers installs output-capturing hooks; Funnel records its sequence
    # length), and the import cache keys on that state, so a warm compile of a model never
    # called would not be the same compile
    with torch.no_grad():
        model(*inputs)
    import torch._dynamo as _dynamo  # noqa: F401
    t, c = time.perf_counter(), time.process_time()
    fast = kiln.compile(model, inputs, **({"precision": "bf16"} if precision == "bf16" else {}))
    # the process's CPU seconds beside the wall clock: on a shared machine the wall clock
    # also counts the time other jobs held the cores
    return {"kiln_warm": time.perf_counter() - t, "kiln_warm_cpu": time.process_time() - c,
            "import_cache_hit": fast.report.import_cache_hit, "compile_cache_hit": fast.report.compile_cache_hit}


# ----------------------------------------------------------------------------- the suite
def _child(args: list[str], env: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "kiln.bench.suite", *args]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        return {"status": "error", "error": f"worker exit {r.returncode} ({'killed' if r.returncode < 0 else tail})"}
    return json.loads(lines[-1])


def run(names=None, precisions=("fp32",), threads=(1, 2), quick: bool = False, repeats: int | None = None,
        isolate: bool | None = None, inductor: bool | None = None, timeout: float = 3600, log=None) -> dict:
    names = list(names or [m.name for m in suite_models.MODELS])
    unknown = [n for n in names if n not in suite_models.BY_NAME]
    if unknown:
        raise ValueError(f"unknown suite models {unknown}; known: {', '.join(suite_models.BY_NAME)}")
    isolate = (not quick) if isolate is None else isolate
    inductor = (not quick) if inductor is None else inductor
    repeats = repeats or (3 if quick else 20)
    log = log or (lambda m: print(f"[kiln bench suite] {m}", file=sys.stderr, flush=True))
    rows = []
    old = torch.get_num_threads()
    try:
        for name in names:
            for prec in precisions:
                if not isolate:
                    row = run_model(name, prec, threads, quick, repeats, inductor, timing=not quick, log=log)
                else:
                    row = _isolated(name, prec, threads, quick, repeats, inductor, timeout, log)
                rows.append(row)
                log(f"{name} {prec}: {row['status']}" + (f" ({row.get('error')})" if row.get("error") else ""))
    finally:
        torch.set_num_threads(old)
    res = {"quick": quick, "precisions": list(precisions), "threads": list(threads), "repeats": repeats,
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    res["summary"] = summarize(res)
    return res


def _isolated(name, prec, threads, quick, repeats, inductor, timeout, log) -> dict:
    th = ",".join(map(str, threads))
    with tempfile.TemporaryDirectory(prefix="kiln-suite-") as cache:
        env = dict(os.environ, KILN_CACHE_DIR=cache, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   KILN_PROGRESS="0")
        args = ["--worker", name, "--precision", prec, "--threads", th, "--repeats", str(repeats)]
        row = _child(args + (["--quick"] if quick else []) + ([] if inductor else ["--no-inductor"]), env, timeout)
        row.setdefault("model", name)
        row.setdefault("precision", prec)
        row.setdefault("suite", suite_models.BY_NAME[name].suite)
        if "kiln_cold" in row.get("compile_s", {}) and not quick:
            log(f"{name} {prec}: warm compile in a new process")
            warm = _child(["--warm", name, "--precision", prec, "--threads", str(threads[0])], env, timeout)
            if "kiln_warm" in warm:
                row["compile_s"]["kiln_warm"] = warm["kiln_warm"]
                row["compile_s"]["kiln_warm_cpu"] = warm.get("kiln_warm_cpu")
                row["warm_cache_hits"] = {k: warm[k] for k in ("import_cache_hit", "compile_cache_hit")}
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kiln bench suite", description=__doc__.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(","))
    if args.worker or args.warm:  # a child process: one JSON line on stdout
        import warnings

        warnings.filterwarnings("ignore")
        if args.warm:
            out = warm_compile(args.warm, args.precision, threads[0])
        else:
            out = run_model(args.worker, args.precision, threads, args.quick, args.repeats or 20,
                            inductor=not args.no_inductor, timing=not args.quick,
                            log=lambda m: print(f"[kiln bench suite] {m}", file=sys.stderr, flush=True))
        print(json.dumps(out), flush=True)
        return 0
    return cmd(args)


def cmd(args) -> int:
    """``kiln bench suite`` (and ``python -m kiln.bench.suite``)."""
    import warnings

    warnings.filterwarnings("ignore")
    names = args.only.split(",") if args.only else None
    res = run(names, tuple(args.precision.split(",")), tuple(int(t) for t in args.threads.split(",")),
              quick=args.quick, repeats=args.repeats,
              inductor=False if getattr(args, "no_inductor", False) else None)
    text = markdown(res)
    sys.stdout.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
