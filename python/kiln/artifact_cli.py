"""The artifact commands of the ``kiln`` CLI: ``compile``, ``run``, ``info`` (and the graph
``kiln dump model.kiln`` shows)."""
from __future__ import annotations

from .errors import KilnError


def compile_to_file(model_ref: str, output: str, **options) -> str:
    """``kiln compile MODEL -o model.kiln``: MODEL as ``kiln dump`` takes it (an example name,
    an ``.onnx`` file with fixed input shapes, or ``package.module:factory``)."""
    import kiln

    from .modelref import load_model

    model, inputs = load_model(model_ref)
    if inputs is None:  # ONNX: example inputs of the shapes the file gives
        inputs = _onnx_inputs(model)
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    compiled = kiln.compile(model, inputs, **options)
    kiln.save(compiled, output)
    return output


def _onnx_inputs(path: str) -> tuple:
    import torch

    from kiln.frontends.onnx_import import from_onnx, load_onnx

    graph = from_onnx(load_onnx(path), None)
    out = []
    for v in graph.inputs:
        if not v.type.is_static:
            raise KilnError(f"{path}: input {v.name!r} has symbolic dims {list(v.type.shape)}; kiln compile needs "
                            f"fixed shapes (compile from Python with example inputs instead)")
        dt = v.type.dtype.to_torch()
        out.append(torch.randn(tuple(v.type.shape)).to(dt) if dt.is_floating_point else torch.zeros(
            tuple(v.type.shape), dtype=dt))
    return tuple(out)


def run_file(path: str, inputs: list[str], output: str | None) -> int:
    """``kiln run model.kiln --input x.npy ...``: outputs to ``-o`` (.npy for one tensor, .npz
    for several) or a summary on standard output."""
    import numpy as np
    import torch

    import kiln

    model = kiln.load(path)
    args = []
    for f in inputs:
        try:
            args.append(torch.from_numpy(np.load(f, allow_pickle=False)))
        except (OSError, ValueError) as e:
            raise KilnError(f"cannot read input {f}: {e}") from None
    with torch.no_grad():
        out = model(*args)
    leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    arrays = [(t.float() if t.dtype == torch.bfloat16 else t).numpy() for t in leaves]
    if output is None:
        for i, (t, a) in enumerate(zip(leaves, arrays)):
            print(f"output {i}: {str(t.dtype).removeprefix('torch.')}{list(t.shape)} "
                  f"first values {np.array2string(a.reshape(-1)[:6], precision=4)}")
    elif output.endswith(".npz"):
        np.savez(output, *arrays)
    elif len(arrays) == 1:
        np.save(output, arrays[0])
    else:
        raise KilnError(f"the model returns {len(arrays)} tensors: name an .npz file with -o")
    return 0


def describe(path: str) -> str:
    """``kiln info model.kiln``: what the artifact holds."""
    from .artifact import info

    m = info(path)
    t, o = m["target"], m["options"]
    lines = [f"{path}: Kiln artifact format {m['format_version']}, written by Kiln {m['kiln_version']} "
             f"(torch {m.get('torch_version', '?')}) on {m.get('created', '?')}",
             f"model: {m.get('model')} (from {m.get('source')})",
             f"target: {t['kind']}:{t['arch']}  features: {' '.join(t['features']) or '-'}",
             "options: " + ", ".join(f"{k}={v}" for k, v in o.items() if v not in (None, [], False) or k == "codegen"),
             "inputs: " + ", ".join(f"{s['name']}: {s['dtype'] or 'value'}{s['shape'] if s['dtype'] else ''}"
                                    for s in m["inputs"]["spec"])]
    dyn = (m["inputs"].get("dynamic") or {}).get("dims") or ()
    if dyn:  # one plan serves these sizes
        lines.append("varying dims: " + ", ".join(
            f"{d['input']} dim {d['axis']} = {d['name']} in [{d['min']}, {'inf' if d['max'] is None else d['max']}]"
            for d in dyn))
    derived = {d["tensor"] for p in m["plans"] for d in p.get("derived") or ()}
    for i, p in enumerate(m["plans"]):
        sig = ", ".join(_type(x) for x in p["signature"]["inputs"])
        outs = ", ".join(_type(x) for x in p["signature"]["outputs"])
        counts: dict[str, int] = {}
        for k in p.get("node_kernels") or ():
            counts[k] = counts.get(k, 0) + 1
        lines.append(f"plan {i}: ({sig}) -> ({outs}); {len(p.get('node_kernels') or ())} nodes")
        lines.append("  kernels: " + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())))
        gen = p.get("generated") or {}
        if gen:
            lines.append(f"  generated kernels: {len(gen)} (" + ", ".join(sorted({g['member'] for g in gen.values()}))
                         + ")")
        rep = p.get("report", {})
        q = rep.get("quantization") or []
        if q:
            lines.append(f"  quantization: {sum(1 for d in q if d.get('quantized'))}/{len(q)} layers integer "
                         f"({', '.join(sorted({d.get('scheme', '?') for d in q}))})")
        s = [d for d in rep.get("sparsity") or [] if d.get("format") != "dense"]
        if s:
            lines.append("  sparse layers: " + ", ".join(f"{d['layer']} {d['format']}" for d in s))
        if rep.get("fallbacks"):
            lines.append(f"  ops run by PyTorch: {', '.join(sorted({f[0] for f in rep['fallbacks']}))}")
    w = m["weights"]["tensors"]
    wbytes = m["member_bytes"].get(m["weights"]["member"], 0)
    dtypes: dict[str, int] = {}
    for r in w.values():
        dtypes[r["dtype"]] = dtypes.get(r["dtype"], 0) + 1
    lines.append(f"weights: {len(w)} tensors, {wbytes / 2**20:.1f} MiB ("
                 + ", ".join(f"{d} x{n}" for d, n in sorted(dtypes.items())) + ")")
    if derived:  # kernels.derived: prepacked forms shipped so the load maps them
        dbytes = sum(_bytes(w[t]) for t in derived if t in w)
        lines.append(f"  of which prepacked by kernels: {len(derived)} tensors, {dbytes / 2**20:.1f} MiB")
    kbytes = sum(n for name, n in m["member_bytes"].items() if name.startswith("kernels/"))
    lines.append(f"file: {m['file_bytes'] / 2**20:.1f} MiB; {len(m['member_bytes']) + 1} members "
                 f"(kernels {kbytes / 2**10:.0f} KiB)")
    return "\n".join(lines) + "\n"


def _bytes(rec: dict) -> int:
    """The size of a weights-index record's tensor."""
    import math

    import torch

    return math.prod(rec["shape"]) * getattr(torch, rec["dtype"].removeprefix("torch.")).itemsize


def _type(encoded) -> str:
    """An IR type as the manifest records it (``kiln.ir.serialize.encode``), read back."""
    from kiln.ir.serialize import decode

    try:
        t = decode(encoded)
        return f"{t.dtype.value}{list(t.shape)}"
    except Exception:  # noqa: BLE001  (a record this Kiln does not know: show it as saved)
        return str(encoded)


def saved_graph(path: str, plan: int = 0):
    """The optimized graph of plan ``plan`` in the artifact, weights included (for ``kiln dump``)."""
    from .artifact import read_graph

    return read_graph(path, plan)
