"""Artifacts: save time, file size, and a cold ``kiln.load`` in a fresh process.

For each model: compile it here, save it, then start new processes that import torch and
kiln, load the artifact, call it once (the first call) and again (steady state), and check
the outputs are bitwise those of the model that was saved. Reported per model (medians over
``--runs`` fresh processes):

* size: the artifact vs the model's ``state_dict`` (parameters and buffers);
* save: seconds in ``kiln.save``;
* import: ``import torch`` and ``import kiln`` (not part of the load). The children may write
  bytecode, and an untimed first child writes it, so Kiln's modules import as an installed
  package's do rather than compiling from source in every process;
* load: seconds in ``kiln.load`` and its split: load_module (the first use of ``kiln.load``
  imports ``kiln.artifact`` and the IR, once per process), then ``compiled.report.seconds``:
  imports (Kiln's runtime and kernel modules, once per process), manifest,
  read_weights (mapped and CRC-32 checked), runtime (the TVM runtime library, loaded once per
  process when the artifact has generated kernels), graphs, kernels (extracting and loading
  the generated modules), prepare (binding kernels: weight prepacking), structure;
* read: reading the whole artifact file once, for scale (from the page cache: the file was
  just written, so this is memory speed, not disk speed);
* first / steady call;
* the peers (``--peer all``, the default; fp32): ONNX Runtime's equivalent — the model
  exported to ONNX and optimized once (``ORT_ENABLE_ALL``, written with
  ``optimized_model_filepath``), then in each new process ``import onnxruntime``, an
  ``InferenceSession`` on the optimized file (no further optimization), first and steady call;
  OpenVINO's — ``convert_model`` + ``save_model`` once, then in each new process
  ``import openvino``, ``compile_model`` on the IR (f32 inference precision) and the calls,
  and the same with its compiled-blob cache (``CACHE_DIR``) warm; AOTInductor's —
  ``aoti_compile_and_package`` on the exported program once (Inductor with freezing; minutes
  per model), then in each new process ``aoti_load_package`` and the calls. The peers'
  imports are outside their figures, as ``import kiln`` is outside Kiln's.
* a Hugging Face model (``hf_*``) returns a ``transformers`` output class, which Kiln's load
  rebuilds, importing ``transformers`` (a second or so, the ``structure`` split). The peers
  return plain arrays. Its row is measured twice: cold, and with ``transformers`` imported
  before the load (as a process serving the model has it, for its tokenizer), untimed like
  the other imports.

    python -m kiln.bench.artifacts [resnet18 bert hf_bert lstm] [--precision bf16|int8-dynamic|int8-static]
                                   [--quick] [--peer all|onnxruntime,openvino,aoti|none]
                                   [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import kiln
path, io = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3 and sys.argv[3]:
    __import__(sys.argv[3])  # a module the serving process has imported anyway (untimed)
t2 = time.perf_counter()
load = kiln.load  # imports kiln.artifact (and the IR it rebuilds): timed as part of the load, shown apart
t2b = time.perf_counter()
m = load(path)
t3 = time.perf_counter()
from safetensors.torch import load_file
d = load_file(io)
ins = [d[f"in{i}"] for i in range(sum(k.startswith("in") for k in d))]
with torch.no_grad():
    t = time.perf_counter(); out = m(*ins); first = time.perf_counter() - t
    t = time.perf_counter(); m(*ins); steady = time.perf_counter() - t
leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
same = len(leaves) == sum(k.startswith("out") for k in d) and all(torch.equal(x, d[f"out{i}"]) for i, x in enumerate(leaves))
t = time.perf_counter()
with open(path, "rb") as f:
    while f.read(1 << 24):
        pass
read = time.perf_counter() - t
print(json.dumps({"import_torch": t1 - t0, "import_kiln": t2 - t1, "load": t3 - t2,
                  "split": {"load_module": t2b - t2, **m.report.seconds},
                  "first_call": first, "steady_call": steady, "read_file": read, "bitwise": same}))
"""

_AOTI_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import torch._inductor
t1 = time.perf_counter()
path, io, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
if len(sys.argv) > 4 and sys.argv[4]:
    __import__(sys.argv[4])  # as Kiln's child has it imported (untimed)
t1 = time.perf_counter()
if len(sys.argv) > 4 and sys.argv[4] == "transformers":
    # the package's output pytree names transformers' output classes, registered by their
    # module's import: part of loading, as Kiln's load rebuilding the same structure imports it
    import transformers.modeling_outputs  # noqa: F401
m = torch._inductor.aoti_load_package(path)
t2 = time.perf_counter()
from safetensors.torch import load_file
d = load_file(io)
ins = [d[f"in{i}"] for i in range(sum(k.startswith("in") for k in d))]
with torch.no_grad():
    t = time.perf_counter(); m(*ins); first = time.perf_counter() - t
    t = time.perf_counter(); m(*ins); steady = time.perf_counter() - t
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_call": first, "steady_call": steady}))
"""

_ORT_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
t1 = time.perf_counter()
path, io, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimized when it was written
if threads:
    opts.intra_op_num_threads = threads
sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
d = np.load(io)
feed = {i.name: d[f"in{k}"] for k, i in enumerate(sess.get_inputs())}
t = time.perf_counter(); sess.run(None, feed); first = time.perf_counter() - t
t = time.perf_counter(); sess.run(None, feed); steady = time.perf_counter() - t
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_call": first, "steady_call": steady}))
"""

_OV_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import numpy as np
import openvino as ov
t1 = time.perf_counter()
path, io, threads, cache = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
core = ov.Core()
config = {"INFERENCE_PRECISION_HINT": "f32"}  # its CPU default on AMX machines is bf16
if threads:
    config["INFERENCE_NUM_THREADS"] = threads
if cache:
    config["CACHE_DIR"] = cache
compiled = core.compile_model(path, "CPU", config)
t2 = time.perf_counter()
d = np.load(io)
feed = [d[f"in{k}"] for k in range(len(compiled.inputs))]
t = time.perf_counter(); compiled(feed); first = time.perf_counter() - t
t = time.perf_counter(); compiled(feed); steady = time.perf_counter() - t
print(json.dumps({"import": t1 - t0, "load": t2 - t1, "first_call": first, "steady_call": steady}))
"""

PEERS = ("onnxruntime", "openvino", "aoti")
DEFAULT_MODELS = ("resnet18", "bert", "hf_bert", "lstm")
QUICK = {"resnet18": dict(image=64), "bert": dict(layers=2, hidden=128, heads=2, seq=32),
         "hf_bert": dict(layers=2, hidden=128, heads=2, seq=32), "lstm": dict(batch=4, seq=16)}


def _state_dict_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def measure(name: str, precision: str = "fp32", quick: bool = False, runs: int = 3, threads: int | None = None,
            peer: str = "all") -> dict:
    import torch
    from safetensors.torch import save_file

    import kiln

    if threads:
        torch.set_num_threads(threads)
    model, inputs = kiln.models.get(name, **(QUICK.get(name, {}) if quick else {}))
    t = time.perf_counter()
    options = {"precision": precision} if precision in ("fp32", "bf16") else \
        {"quantize": precision, **({"calibration": [inputs]} if precision == "int8-static" else {})}
    compiled = kiln.compile(model, inputs, **options)
    compile_s = time.perf_counter() - t
    with torch.no_grad():
        out = compiled(*inputs)
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    row = {"model": name, "precision": precision, "compile": compile_s, "state_dict_bytes": _state_dict_bytes(model)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"{name}.kiln")
        t = time.perf_counter()
        kiln.save(compiled, path)
        row["save"] = time.perf_counter() - t
        row["artifact_bytes"] = os.path.getsize(path)
        io = os.path.join(d, "io.safetensors")
        save_file({**{f"in{i}": x for i, x in enumerate(inputs)},
                   **{f"out{i}": x.contiguous() for i, x in enumerate(leaves)}}, io)
        # Python may write bytecode (as an installed package has it): the untimed first child
        # compiles Kiln's modules, the timed ones import them as a deployment would
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        if threads:
            env.update(OMP_NUM_THREADS=str(threads))
        subprocess.run([sys.executable, "-c", _CHILD, path, io], capture_output=True, text=True, env=env)
        variants = [("", row)]
        if name.startswith("hf_"):  # again with the output classes' library already imported
            row["preimported"] = {**{k: row[k] for k in ("model", "precision", "compile", "state_dict_bytes",
                                                          "save", "artifact_bytes")}, "preimport": "transformers"}
            variants.append(("transformers", row["preimported"]))
        for preimport, into in variants:
            children = []
            for _ in range(runs):
                r = subprocess.run([sys.executable, "-c", _CHILD, path, io, preimport], capture_output=True,
                                   text=True, env=env)
                if r.returncode != 0:
                    row["error"] = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
                    return row
                children.append(json.loads(r.stdout.strip().splitlines()[-1]))
            for k in ("import_torch", "import_kiln", "load", "first_call", "steady_call", "read_file"):
                into[k] = statistics.median(c[k] for c in children)
            into["split"] = {k: statistics.median(c["split"].get(k, 0.0) for c in children)
                             for k in children[0]["split"]}
            into["bitwise"] = all(c["bitwise"] for c in children)
        peers = set(PEERS) if peer == "all" else set() if peer == "none" else set(peer.split(","))
        if "onnxruntime" in peers:
            row["onnxruntime"] = _ort(model, inputs, d, runs, threads, env)
        if "openvino" in peers:
            row["openvino"] = _openvino(model, inputs, d, runs, threads, env)
        if "aoti" in peers:
            row["aoti"] = _aoti(model, inputs, d, runs, threads, env, "transformers" if name.startswith("hf_") else "")
    return row


def _ort(model, inputs, folder: str, runs: int, threads: int | None, env: dict) -> dict:
    """ONNX Runtime: export, optimize once into a file, then load it in fresh processes."""
    import io as _io
    import warnings

    import numpy as np
    import onnxruntime as ort
    import torch

    raw, optimized = _io.BytesIO(), os.path.join(folder, "optimized.onnx")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, inputs, raw, opset_version=17, dynamo=False)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = optimized
        ort.InferenceSession(raw.getvalue(), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001  (a model ONNX export cannot take: reported, not fatal)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
    io = os.path.join(folder, "ort_inputs.npz")
    np.savez(io, **{f"in{i}": x.numpy() for i, x in enumerate(inputs)})
    children = []
    for _ in range(runs + 1):  # the first: untimed, as for Kiln
        r = subprocess.run([sys.executable, "-c", _ORT_CHILD, optimized, io, str(threads or 0)],
                           capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
        children.append(json.loads(r.stdout.strip().splitlines()[-1]))
    out = {k: statistics.median(c[k] for c in children[1:]) for k in children[1]}
    out["file_bytes"] = os.path.getsize(optimized)
    return out


def _aoti(model, inputs, folder: str, runs: int, threads: int | None, env: dict, preimport: str = "") -> dict:
    """AOTInductor: ``torch.export`` + ``aoti_compile_and_package`` once (Inductor with freezing,
    as the strongest Inductor configuration runs), then ``aoti_load_package`` in fresh processes
    (``preimport``: a module imported first, untimed, as in Kiln's child — ``transformers``
    for a Hugging Face model, whose package then imports its output classes' module inside
    the timed load, as Kiln's load does to rebuild the same structure)."""
    import warnings

    import torch
    from safetensors.torch import save_file

    package = os.path.join(folder, "model.pt2")
    t = time.perf_counter()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, tuple(inputs))
            torch._inductor.aoti_compile_and_package(ep, package_path=package, inductor_configs={"freezing": True})
    except Exception as e:  # noqa: BLE001  (a model AOTInductor cannot build: reported, not fatal)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
    build = time.perf_counter() - t
    io = os.path.join(folder, "aoti_inputs.safetensors")
    save_file({f"in{i}": x.contiguous() for i, x in enumerate(inputs)}, io)
    out = _children(_AOTI_CHILD, [package, io, str(threads or 0), preimport], runs, env)
    if "error" not in out:
        out["file_bytes"] = os.path.getsize(package)
        out["build"] = build
    return out


def _children(code: str, argv: list, runs: int, env: dict) -> dict:
    """Medians of ``runs`` timed children (after an untimed first), or {"error": ...}."""
    children = []
    for _ in range(runs + 1):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return {"error": (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]}
        children.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(c[k] for c in children[1:]) for k in children[1]}


def _openvino(model, inputs, folder: str, runs: int, threads: int | None, env: dict) -> dict:
    """OpenVINO: ``convert_model`` + ``save_model`` (fp32 weights) once, then in fresh
    processes ``compile_model`` on the saved IR and a first call; again with ``CACHE_DIR``
    (its compiled-blob cache, filled by the untimed first child), OpenVINO's closest
    equivalent of loading a compiled artifact."""
    import warnings

    import numpy as np
    import torch

    xml = os.path.join(folder, "model.xml")
    try:
        import openvino as ov

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ov.save_model(ov.convert_model(model, example_input=tuple(inputs)), xml, compress_to_fp16=False)
    except Exception as e:  # noqa: BLE001  (a model the converter cannot take: reported, not fatal)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"}
    io = os.path.join(folder, "ov_inputs.npz")
    np.savez(io, **{f"in{i}": x.numpy() for i, x in enumerate(inputs)})
    out = _children(_OV_CHILD, [xml, io, str(threads or 0), ""], runs, env)
    if "error" not in out:
        out["file_bytes"] = os.path.getsize(xml) + os.path.getsize(xml[:-4] + ".bin")
        cached = _children(_OV_CHILD, [xml, io, str(threads or 0), os.path.join(folder, "ov_cache")], runs, env)
        out["cached"] = cached
    return out


def markdown(rows: list[dict]) -> str:
    lines = _kiln_table(rows)
    peers = [r for r in rows if "onnxruntime" in r]
    if peers:
        lines += ["", "| model | Kiln load + first call s | the same without Kiln's module imports s | "
                  "ONNX Runtime session + first call s | ORT split (import, session, first call, steady ms) | .onnx MB |",
                  "|---|---:|---:|---:|---|---:|"]
        for r in peers:
            o = r["onnxruntime"]
            if "error" in o:
                lines.append(f"| {r['model']} | | | error: {o['error']} | | |")
                continue
            lines.append(f"| {r['model']} | {r['load'] + r['first_call']:.3f} | {_without_imports(r):.3f} | "
                         f"{o['load'] + o['first_call']:.3f} | "
                         f"{o['import']:.2f}, {o['load']:.3f}, {o['first_call']:.3f}, {o['steady_call'] * 1e3:.1f} | "
                         f"{o['file_bytes'] / 1e6:.1f} |")
    ov_rows = [r for r in rows if "openvino" in r]
    if ov_rows:
        lines += ["", "| model | Kiln load + first call s | the same without Kiln's module imports s | "
                  "OpenVINO compile_model + first call s | with CACHE_DIR s | "
                  "OV split (import, compile, first call, steady ms) | cached split (compile, first call) | IR MB |",
                  "|---|---:|---:|---:|---:|---|---|---:|"]
        for r in ov_rows:
            o = r["openvino"]
            if "error" in o:
                lines.append(f"| {r['model']} | | | error: {o['error']} | | | | |")
                continue
            c = o.get("cached", {})
            cs = f"{c['load'] + c['first_call']:.3f}" if "load" in c else f"error: {c.get('error', '?')}"
            csplit = f"{c['load']:.3f}, {c['first_call']:.3f}" if "load" in c else ""
            lines.append(f"| {r['model']} | {r['load'] + r['first_call']:.3f} | {_without_imports(r):.3f} | "
                         f"{o['load'] + o['first_call']:.3f} | {cs} | "
                         f"{o['import']:.2f}, {o['load']:.3f}, {o['first_call']:.3f}, {o['steady_call'] * 1e3:.1f} | "
                         f"{csplit} | {o['file_bytes'] / 1e6:.1f} |")
    aoti_rows = [r for r in rows if "aoti" in r]
    if aoti_rows:
        lines += ["", "| model | Kiln load + first call s | the same without Kiln's module imports s | "
                  "AOTInductor aoti_load_package + first call s | AOTI split (load, first call, steady ms) | "
                  "build s | .pt2 MB |",
                  "|---|---:|---:|---:|---|---:|---:|"]
        for r in aoti_rows:
            o = r["aoti"]
            if "error" in o:
                lines.append(f"| {r['model']} | | | error: {o['error']} | | | |")
                continue
            k = r["preimported"] if "load" in r.get("preimported", {}) else r  # both with transformers imported
            lines.append(f"| {r['model']} | {k['load'] + k['first_call']:.3f} | {_without_imports(k):.3f} | "
                         f"{o['load'] + o['first_call']:.3f} | {o['load']:.3f}, {o['first_call']:.3f}, "
                         f"{o['steady_call'] * 1e3:.1f} | {o['build']:.0f} | {o['file_bytes'] / 1e6:.1f} |")
    pre = [r["preimported"] for r in rows if "load" in r.get("preimported", {})]
    if pre:
        lines += ["", "With ``transformers`` imported before the load (untimed, as a process serving the model "
                  "has it for its tokenizer):", ""] + _kiln_table(pre)
        lines += ["", "| model | Kiln load + first call s | without Kiln's module imports s |", "|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['load'] + r['first_call']:.3f} | {_without_imports(r):.3f} |" for r in pre]
    return "\n".join(lines) + "\n"


def _without_imports(r: dict) -> float:
    """Kiln's load + first call less the first import of the modules it needs: ``kiln.load``'s
    own module with the IR (``load_module``, on first use of ``kiln.load``) and the runtime and
    kernel modules (``imports``). The peers' figures exclude ``import onnxruntime`` /
    ``import openvino``, which load their whole runtimes."""
    return r["load"] - r["split"].get("load_module", 0.0) - r["split"].get("imports", 0.0) + r["first_call"]


def _kiln_table(rows: list[dict]) -> list[str]:
    lines = ["| model | precision | state_dict MB | artifact MB | save s | import torch+kiln s | load s | "
             "load split (s) | read file s | first call ms | steady ms | bitwise |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['precision']} | error: {r['error']} |")
            continue
        split = ", ".join(f"{k} {v:.3f}" for k, v in r["split"].items() if k != "total")
        lines.append(f"| {r['model']} | {r['precision']} | {r['state_dict_bytes'] / 1e6:.1f} | "
                     f"{r['artifact_bytes'] / 1e6:.1f} | {r['save']:.2f} | {r['import_torch'] + r['import_kiln']:.2f} | "
                     f"{r['load']:.3f} | {split} | {r['read_file']:.3f} | {r['first_call'] * 1e3:.1f} | "
                     f"{r['steady_call'] * 1e3:.1f} | {'yes' if r['bitwise'] else 'NO'} |")
    return lines


def _peers(text: str) -> str:
    if text in ("all", "none") or (text and set(text.split(",")) <= set(PEERS)):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected all, none or a list of {', '.join(PEERS)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kiln.bench.artifacts", description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=list(DEFAULT_MODELS))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8-dynamic", "int8-static"],
                   help="int8-static calibrates on the example inputs")
    p.add_argument("--quick", action="store_true", help="small model configurations (CI)")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per model (medians reported)")
    p.add_argument("--threads", type=int, help="torch threads in every process (default: torch's)")
    p.add_argument("--peer", default="all", type=_peers,
                   help="also time the peers' equivalents (fp32 only): all (ONNX Runtime, OpenVINO and "
                        "AOTInductor), none, or a comma-separated list of onnxruntime, openvino, aoti")
    p.add_argument("--json", metavar="FILE")
    a = p.parse_args(argv)
    rows = [measure(m, a.precision, a.quick, a.runs, a.threads, a.peer if a.precision == "fp32" else "none")
            for m in a.models]
    sys.stdout.write(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all("error" not in r and r["bitwise"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
