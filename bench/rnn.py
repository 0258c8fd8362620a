"""Recurrent layers per batch size: Kiln's LSTM/GRU kernels against ONNX Runtime and torch.

A forecaster in service often sees one series, or a few, per request: there the recurrence
is a few rows times the weight panels at every step, and what wins at batch 32 need not win
at batch 1. For each batch size this times, interleaved in one process (rounds rotate the
order), every Kiln CPU kernel that accepts the layer (``cpu.lstm_layer``: the input projection
inside each step; ``cpu.lstm_hoisted``: one GEMM for every step's projection, then the
recurrence), torch's ``nn.LSTM`` and ONNX Runtime's session on the same module exported to
ONNX, and checks each output against torch's.

    python -m kiln.bench.rnn [--cell lstm|gru] [--batches 1,2,4,7,16,32] [--seq 96]
                             [--features 8] [--hidden 128] [--layers 2] [--threads 1]
                             [--repeats 30] [--json FILE]

Prints a table of medians (ms) and each Kiln kernel's ratio to ONNX Runtime's time.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time


def _kiln_kernels(module: torch.nn.Module, cell: str, x: torch.Tensor) -> dict:
    """name -> callable(x) for every registered Kiln CPU kernel that accepts this layer."""
    import torch

    from kiln.frontends.torch_export import export_program, from_exported
    from kiln.ir import OpKind
    from kiln.kernels.registry import candidates

    g = from_exported(export_program(module, (x,)), "rnn").graph
    kind = OpKind.LSTM if cell == "lstm" else OpKind.GRU
    node = next(n for n in g.nodes if n.op is kind)
    consts = [None if v is None else g.constants.get(v) for v in node.inputs]
    nstate = 2 if cell == "lstm" else 1
    states: dict[int, list] = {}  # per batch size, made before the timed calls

    def initial(batch: int) -> list:
        if batch not in states:
            states[batch] = [torch.zeros(module.num_layers, batch, module.hidden_size) for _ in range(nstate)]
        return states[batch]

    out = {}
    for k in candidates(node, "cpu"):
        if k.name in ("cpu.lstm", "cpu.gru") or not k.name.startswith("cpu."):
            continue  # the op-by-op cell (torch's steps, Kiln's cell): far behind at every batch
        run = k.bind(node, consts)
        out[k.name] = lambda xb, run=run: run([xb, *initial(xb.shape[0]), *consts[1 + nstate:]], node.attrs)[0]
    return out


def _onnxruntime(module: torch.nn.Module, x: torch.Tensor, threads: int):
    import onnxruntime as ort
    import torch

    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, input_names=["x"], output_names=["y"], dynamo=False,
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    return lambda xb: torch.from_numpy(sess.run(None, {"x": xb.numpy()})[0])


def _layer(cell: str, features: int, hidden: int, layers: int):
    """The recurrent layers alone, returning their output sequence."""
    import torch

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(features, hidden, layers, batch_first=True)

        def forward(self, x):
            return self.rnn(x)[0]

    return Layer()


def run(cell: str = "lstm", batches=(1, 2, 4, 7, 16, 32), seq: int = 96, features: int = 8, hidden: int = 128,
        layers: int = 2, threads: int = 1, repeats: int = 30, peers: bool = True) -> dict:
    import torch

    from kiln.kernels.timing import interleaved

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    module = _layer(cell, features, hidden, layers).eval()
    example = torch.randn(max(batches), seq, features)
    with torch.no_grad():
        kernels = _kiln_kernels(module.rnn, cell, example)
        engines = {**kernels, "torch": module}
        if peers:
            engines["onnxruntime"] = _onnxruntime(module, example, threads)
        rows = []
        for b in batches:
            x = example[:b].contiguous()
            want = module(x)
            row = {"batch": b, "ms": {}, "max_abs_err": {}}
            fns = {}
            for name, fn in engines.items():
                got = fn(x)
                row["max_abs_err"][name] = float((got - want).abs().max())
                fns[name] = (lambda fn=fn: fn(x))
            res = interleaved(list(fns.values()), repeats, warmup=2, rotate=True)
            row["ms"] = {name: r.median * 1e3 for name, r in zip(fns, res) if r.samples}
            rows.append(row)
    return {"cell": cell, "seq": seq, "features": features, "hidden": hidden, "layers": layers,
            "threads": threads, "repeats": repeats, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "kernels": list(kernels), "rows": rows}


def table(res: dict) -> str:
    names = list(res["rows"][0]["ms"])
    head = ["batch", *(f"{n} ms" for n in names)]
    kiln = [n for n in names if n.startswith("cpu.")]
    if "onnxruntime" in names:
        head += [f"{n} vs ORT" for n in kiln]
    lines = [f"{res['cell'].upper()} {res['layers']} x {res['hidden']}, {res['features']} features, "
             f"{res['seq']} steps, "
             f"{res['threads']} thread(s); medians of {res['repeats']} interleaved rounds ({res['date']})", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in res["rows"]:
        cells = [str(r["batch"]), *(f"{r['ms'][n]:.3f}" for n in names)]
        if "onnxruntime" in names:
            cells += [f"{r['ms']['onnxruntime'] / r['ms'][n]:.2f}x" for n in kiln]
        lines.append("| " + " | ".join(cells) + " |")
    worst = max(e for r in res["rows"] for e in r["max_abs_err"].values())
    lines += ["", f"largest difference from torch's output over every engine and batch: {worst:.1e}",
              "(ratio above 1: faster than ONNX Runtime)"]
    return "\n".join(lines) + "\n"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    ap.add_argument("--batches", default="1,2,4,7,16,32")
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--features", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--no-peers", action="store_true", help="Kiln's kernels and torch only (no ONNX Runtime)")
    ap.add_argument("--json", help="also write the results here")


def main_with(args) -> int:
    res = run(args.cell, tuple(int(b) for b in args.batches.split(",")), args.seq, args.features, args.hidden,
              args.layers, args.threads, args.repeats, peers=not args.no_peers)
    sys.stdout.write(table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kiln bench rnn", description=__doc__.splitlines()[0])
    add_arguments(ap)
    return main_with(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
