"""The ``kiln`` command line."""
from __future__ import annotations

import argparse
import importlib
import sys

from .options import OBSERVERS, QUANT_SCHEMES, SPARSE_MODES


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.models, threads=args.threads, repeat=args.repeat)


def _cmd_explain(args) -> int:
    from .modelref import load_model

    import kiln

    model, inputs = load_model(args.model)
    opts = {k: v for k, v in (("precision", args.precision), ("quantize", args.quantize)) if v is not None}
    if args.quantize == "int8-static" and inputs is not None:  # calibrated on the example inputs, as kiln compile does
        opts["calibration"] = [inputs if isinstance(inputs, tuple) else (inputs,)]
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        opts["threads"] = args.threads
    print(kiln.explain(model, inputs, profile=not args.no_profile, runs=args.runs, **opts))
    return 0


def _write(text: str, out: str | None) -> None:
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def _cmd_dump(args) -> int:
    import os

    from . import dump

    if args.model.endswith(".kiln"):  # an artifact holds the optimized graph: shown as saved
        from .artifact_cli import saved_graph

        stages = [dump.Stage("saved", "saved", "saved", saved_graph(args.model))]
    else:
        graph = dump.import_model(args.model)
        select = args.passes.split(",") if args.passes else None
        stages = dump.run_stages(graph, select)
    if args.each_pass:
        os.makedirs(args.each_pass, exist_ok=True)
        ext = {"text": "txt"}.get(args.format, args.format)
        for i, st in enumerate(stages):
            path = os.path.join(args.each_pass, f"{i:02d}_{st.label.replace('/', '_')}.{ext}")
            with open(path, "w") as f:
                f.write(dump.render(st.graph, args.format))
        print(f"wrote {len(stages)} files to {args.each_pass}", file=sys.stderr)
        return 0
    if args.diff:
        a, b = args.diff
        ga = dump.pick(stages, a) if a != "input" else stages[0].graph
        gb = dump.pick(stages, b) if b != "input" else stages[0].graph
        _write(dump.diff(ga, gb, a, b), args.output)
        return 0
    if args.after:
        g = dump.pick(stages, args.after)
    elif args.before:
        g = dump.pick(stages, args.before, before=True)
    else:
        g = stages[-1].graph
    _write(dump.stats(g) if args.stats else dump.render(g, args.format), args.output)
    return 0


def _cmd_bench_kernels(args) -> int:
    from kiln.bench import kernels as kernel_bench

    res = kernel_bench.run(target=args.target, quick=args.quick, op=args.op, shapes=args.shapes.split(",") if args.shapes else None,
                repeats=args.repeats, threads=args.threads, precision=args.precision)
    sys.stdout.write(kernel_bench.table(res))
    if args.json:
        kernel_bench.save_json(res, args.json)
    if args.csv:
        kernel_bench.write_csv(res, args.csv)
    if args.plot:
        kernel_bench.plot(res, args.plot)
    return 0


def _cmd_tune(args) -> int:
    import torch

    import kiln

    from .modelref import load_model

    model, inputs = load_model(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = {"precision": args.precision}
    before = kiln.compile(model, inputs, **opts).report  # the recorded choices, if cached
    after = kiln.compile(model, inputs, remeasure=True, **opts).report
    changed = [(label, a, b) for (label, a), (_, b) in zip(before.node_kernels, after.node_kernels) if a != b]
    print(f"{args.model}: {len(after.node_kernels)} nodes re-measured, {len(changed)} choice(s) changed"
          + (" (the compile cache now holds the new ones)" if changed else ""))
    for label, a, b in changed:
        print(f"  {label}: {a} -> {b}")
    return 0


def _cmd_bench_models(args) -> int:
    from kiln.bench import models as model_bench

    threads = tuple(int(t) for t in args.threads.split(","))
    res = model_bench.run(args.models or None, quick=args.quick, engines=args.engines.split(",") if args.engines else None,
                threads=threads, repeats=args.repeats)
    sys.stdout.write(model_bench.markdown(res))
    model_bench.save(res, args.json, args.markdown)
    return 0


def _cmd_bench_dynamic(args) -> int:
    from kiln.bench import dynamic

    return dynamic.main_with(args)


def _cmd_bench_suite_dynamo(args) -> int:
    from kiln.bench import suite_dynamo

    return suite_dynamo.cmd(args)


def _cmd_bench_suite(args) -> int:
    from kiln.bench import suite

    return suite.cmd(args)


def _cmd_bench_elementwise(args) -> int:
    from kiln.bench import elementwise

    return elementwise.main_with(args)


def _cmd_bench_rnn(args) -> int:
    from kiln.bench import rnn

    return rnn.main_with(args)


def _cmd_bench_serve(args) -> int:
    from kiln.bench import serve as serve_bench

    return serve_bench.main_with(args)


def _cmd_serve(args) -> int:
    try:
        from . import serving
    except ImportError as e:
        print(f"kiln: error: kiln serve needs Ray Serve (pip install 'kiln[ray]'): {e}", file=sys.stderr)
        return 2
    import signal
    import time

    def _stop(*_):
        raise KeyboardInterrupt

    serving.run(args.artifact, address=args.address, port=args.port, host=args.host, replicas=args.replicas,
                max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, threads=args.threads)
    # a service manager's stop shuts Serve down as Ctrl-C does (set after ray.init, which installs its own)
    signal.signal(signal.SIGTERM, _stop)
    print(f"serving {args.artifact} at http://{args.host}:{args.port}/ ({args.replicas} replica(s), batches of up "
          f"to {args.max_batch_size} within {args.batch_wait_ms} ms); GET /health, /info; Ctrl-C stops", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        print("kiln serve: shutting down", flush=True)
        serve.shutdown()
    return 0


def _cmd_debug_accuracy(args) -> int:
    from .debugging import accuracy_report

    report = accuracy_report(args.model, rel=args.rtol, passes=args.passes.split(",") if args.passes else None)
    print(report)
    return 1 if report.divergence else 0


def _cmd_sparsity_report(args) -> int:
    import torch

    import kiln

    from .modelref import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, inputs = load_model(args.model)
    if inputs is None:
        raise kiln.KilnError("sparsity-report needs a PyTorch model (an example name or package.module:factory)")
    pruned = model
    if args.sparsity > 0:
        layers = args.layers.split(",") if args.layers else None
        pruned = kiln.sparsify(model, args.sparsity, args.pattern, layers)
    print(kiln.sparsity_report(pruned, inputs, dense_model=model if pruned is not model else None,
                               sparse=args.sparse, repeats=args.repeats))
    return 0


def _cmd_quantize_report(args) -> int:
    from .modelref import load_model

    import kiln

    model, inputs = load_model(args.model)
    if inputs is None:
        from kiln.errors import KilnError

        raise KilnError("quantize-report needs a model with example inputs (a built-in name or module:factory)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # calibration: the example inputs (representative data needs the Python API)
    report = kiln.quantize_report(model, inputs, quantize=args.scheme, calibration=[inputs],
                                  **({"observer": args.observer} if args.observer else {}))
    print(report)
    return 0


def _cmd_compile(args) -> int:
    from .artifact_cli import compile_to_file

    opts = {k: v for k, v in (("precision", args.precision), ("quantize", args.quantize), ("sparse", args.sparse),
                              ("target", args.target), ("threads", args.threads)) if v is not None}
    print(f"wrote {compile_to_file(args.model, args.output, **opts)}", file=sys.stderr)
    return 0


def _cmd_run(args) -> int:
    from .artifact_cli import run_file

    return run_file(args.artifact, args.input or [], args.output)


def _cmd_info(args) -> int:
    from .artifact_cli import describe

    sys.stdout.write(describe(args.artifact))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kiln", description="Kiln: a deep-learning compiler for PyTorch and ONNX models.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    d = sub.add_parser("demo", help="compile the built-in example models and compare with eager PyTorch")
    d.add_argument("models", nargs="*", default=["resnet18", "bert", "lstm"],
                   help="example models (resnet18, resnet50, bert, hf_bert, lstm, gru)")
    d.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    d.add_argument("--repeat", type=int, default=10, help="timed runs per model (median reported)")
    d.set_defaults(fn=_cmd_demo)
    cp = sub.add_parser("compile", help="compile a model and save it as one artifact file (kiln.save)")
    cp.add_argument("model", help="example model name, file.onnx (fixed input shapes), or package.module:factory")
    cp.add_argument("-o", "--output", required=True, help="the artifact to write (model.kiln)")
    cp.add_argument("--precision", choices=["fp32", "bf16"])
    cp.add_argument("--quantize", choices=[*QUANT_SCHEMES, "bf16"])
    cp.add_argument("--sparse", help=f"sparse mode: {', '.join(SPARSE_MODES)}")
    cp.add_argument("--target", help="cpu (default) or cuda")
    cp.add_argument("--threads", type=int, help="torch threads the kernels are chosen for")
    cp.set_defaults(fn=_cmd_compile)
    rp = sub.add_parser("run", help="load an artifact and run it on .npy inputs")
    rp.add_argument("artifact", help="a file written by kiln compile or kiln.save")
    rp.add_argument("--input", "-i", action="append", metavar="X.npy", help="an input, in order (repeat)")
    rp.add_argument("-o", "--output", help="write the output (.npy) or outputs (.npz) here")
    rp.set_defaults(fn=_cmd_run)
    sv = sub.add_parser("serve", help="serve an artifact over HTTP with Ray Serve (request batching, replicas)")
    sv.add_argument("artifact", help="a file written by kiln compile or kiln.save")
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--max-batch-size", type=int, default=8, help="requests per batch (default 8)")
    sv.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    sv.add_argument("--threads", type=int, default=1, help="threads (and Ray CPUs) per replica (default 1)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--host", default="127.0.0.1", help="address the HTTP proxy binds (0.0.0.0: every interface)")
    sv.add_argument("--address", help="join this Ray cluster (e.g. auto) instead of starting a local one")
    sv.set_defaults(fn=_cmd_serve)
    ip = sub.add_parser("info", help="what an artifact holds: versions, target, inputs, plans, kernels, weights")
    ip.add_argument("artifact")
    ip.set_defaults(fn=_cmd_info)
    dp = sub.add_parser("dump", help="show the IR of a model before/after the compiler's passes",
                        description="Dump a model's Kiln IR: by default after the full pipeline.")
    dp.add_argument("model", help="example model name, file.onnx, graph.json (a saved Kiln graph), "
                                  "model.kiln (an artifact's graph, as saved), or package.module:factory")
    dp.add_argument("--format", "-f", default="text", choices=["text", "json", "dot", "svg", "html"])
    dp.add_argument("-o", "--output", help="write to this file (default: standard output)")
    stage = dp.add_mutually_exclusive_group()
    stage.add_argument("--after", metavar="PASS", help="the graph after this pass or phase")
    stage.add_argument("--before", metavar="PASS", help="the graph before this pass or phase")
    stage.add_argument("--each-pass", metavar="DIR", help="write one numbered file per pass into DIR")
    stage.add_argument("--diff", nargs=2, metavar=("A", "B"),
                       help="what changed between stage A and stage B (pass/phase names, or 'input')")
    stage.add_argument("--stats", action="store_true",
                       help="per op kind: count, parameters, FLOPs and bytes; kernel groups; fallbacks")
    dp.add_argument("--passes", help="comma-separated passes/phases to run ('-name' skips one)")
    dp.set_defaults(fn=_cmd_dump)
    tp = sub.add_parser("tune", help="re-measure a model's kernel choices and replace the cached ones")
    tp.add_argument("model", help="example model name, file.onnx, or package.module:factory")
    tp.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    tp.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    tp.set_defaults(fn=_cmd_tune)
    bp = sub.add_parser("bench", help="kernel microbenchmarks and end-to-end model benchmarks")
    bsub = bp.add_subparsers(dest="bench_cmd", metavar="WHAT")
    bk = bsub.add_parser("kernels", help="every kernel for a target vs the torch reference, with roofline")
    bk.add_argument("--target", default="cpu")
    bk.add_argument("--op", help="only this op kind (e.g. linear, conv2d, lstm)")
    bk.add_argument("--shapes", help="GEMM shapes MxKxN,... instead of the example models' shapes")
    bk.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                    help="compile the example models in this precision first (bf16: their bf16 kernels)")
    bk.add_argument("--quick", action="store_true", help="small shapes and few repeats (CI)")
    bk.add_argument("--repeats", type=int)
    bk.add_argument("--threads", type=int)
    bk.add_argument("--json", metavar="FILE")
    bk.add_argument("--csv", metavar="FILE")
    bk.add_argument("--plot", metavar="PNG", help="roofline plot")
    bk.set_defaults(fn=_cmd_bench_kernels)
    bm = bsub.add_parser("models", help="eager vs Inductor vs ONNX Runtime vs TVM vs Kiln, end to end")
    bm.add_argument("models", nargs="*", help="example model names (default: resnet18 bert lstm)")
    bm.add_argument("--quick", action="store_true", help="small configs, few repeats, no TVM (CI)")
    bm.add_argument("--engines", help="comma-separated subset of eager,inductor,onnxruntime,tvm,kiln")
    bm.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    bm.add_argument("--repeats", type=int)
    bm.add_argument("--json", metavar="FILE")
    bm.add_argument("--markdown", metavar="FILE")
    bm.set_defaults(fn=_cmd_bench_models)
    # benches whose modules define their own arguments (importing them imports neither torch nor ray)
    for name, help_, module, fn in (
            ("dynamic", "a stream of requests whose shapes change every call, per engine",
             "kiln.bench.dynamic", _cmd_bench_dynamic),
            ("suite", "the Hugging Face model suite: pass rate, fallbacks, speedups, compile time",
             "kiln.bench.suite_report", _cmd_bench_suite),
            ("suite-dynamo", "the model suite through torch.compile(backend='kiln'): pass rate, graph breaks",
             "kiln.bench.suite_dynamo", _cmd_bench_suite_dynamo),
            ("elementwise", "a generated fused elementwise kernel vs memory bandwidth and eager",
             "kiln.bench.elementwise", _cmd_bench_elementwise),
            ("rnn", "LSTM/GRU layers per batch size: Kiln's kernels against ONNX Runtime and torch",
             "kiln.bench.rnn", _cmd_bench_rnn),
            ("serve", "Ray Serve throughput and latency, Kiln vs eager; Ray Data offline inference",
             "kiln.bench.serve", _cmd_bench_serve)):
        sp = bsub.add_parser(name, help=help_)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(fn=fn)
    bp.set_defaults(fn=lambda a: (bp.print_help(), 0)[1])
    dbg = sub.add_parser("debug", help="debugging tools")
    dsub = dbg.add_subparsers(dest="debug_cmd", metavar="WHAT")
    da = dsub.add_parser("accuracy", help="name the first pass (and node) where outputs diverge from the reference")
    da.add_argument("model", help="example model name, file.onnx, or package.module:factory")
    da.add_argument("--rtol", type=float, default=1e-4, help="tolerance: max abs error <= rtol * max(1, |ref|max)")
    da.add_argument("--passes", help="comma-separated passes/phases to run ('-name' skips one)")
    da.set_defaults(fn=_cmd_debug_accuracy)
    dbg.set_defaults(fn=lambda a: (dbg.print_help(), 0)[1])
    e = sub.add_parser("explain", help="list the ops of a model that fall back to PyTorch, why, and their share "
                                       "of its time")
    e.add_argument("model", help="an example model name, an ONNX file, or package.module:factory")
    e.add_argument("--no-profile", action="store_true", help="skip timing the compiled model's steps")
    e.add_argument("--runs", type=int, default=5, help="timed runs per step (median; default 5)")
    e.add_argument("--precision", choices=["fp32", "bf16"], help="compile in this precision (as kiln.compile)")
    e.add_argument("--quantize", choices=[*QUANT_SCHEMES, "bf16"],
                   help="quantize (int8-static calibrates on the example inputs)")
    e.add_argument("--threads", type=int, help="torch threads for the compile and the profile")
    e.set_defaults(fn=_cmd_explain)
    sr = sub.add_parser("sparsity-report", help="prune a model and show what sparse kernels buy, per layer and end to end")
    sr.add_argument("model", help="example model name or package.module:factory")
    sr.add_argument("--sparsity", type=float, default=0.0, help="prune to this sparsity first (default: as given)")
    sr.add_argument("--pattern", default="unstructured", help="unstructured, block(r,c), 2:4 or channel")
    sr.add_argument("--layers", help="comma-separated module names or fnmatch patterns to prune (default: all)")
    sr.add_argument("--sparse", default="auto",
                    help=f"the compile's sparse option: {', '.join(m for m in SPARSE_MODES if m != 'off')}")
    sr.add_argument("--repeats", type=int, default=10)
    sr.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    sr.set_defaults(fn=_cmd_sparsity_report)
    qr = sub.add_parser("quantize-report", help="per-layer quantization decisions, accuracy and speed")
    qr.add_argument("model", help="an example model name or package.module:factory")
    qr.add_argument("--scheme", default="int8-dynamic", choices=[*QUANT_SCHEMES, "bf16"])
    qr.add_argument("--observer", choices=OBSERVERS, help="int8-static range observer")
    qr.add_argument("--threads", type=int)
    qr.set_defaults(fn=_cmd_quantize_report)
    args = p.parse_args(argv)
    if args.version:
        from . import __version__

        print(f"kiln {__version__}")
        return 0
    if not getattr(args, "fn", None):
        p.print_help()
        return 0
    import warnings

    from .errors import KilnError

    # torch.export's own deprecation chatter is not the user's business
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="The tensor attributes")
    try:
        return args.fn(args)
    except KilnError as err:
        print(f"kiln: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
