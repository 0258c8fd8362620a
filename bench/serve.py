"""``kiln bench serve``: a saved artifact behind Ray Serve, and over Ray Data, vs eager.

    python -m kiln.bench.serve [--models resnet18,bert] [--replicas 1,2] [--batch 8]
                               [--duration 10] [--clients 8] [--rate 0] [--offline 10000]
                               [--quick] [--json FILE]

For each model the example model (``kiln.models``) is compiled for batch sizes 1, 2, 4 ...
up to ``--batch`` and saved; then, on a local Ray cluster, for each engine (``kiln``: the
artifact; ``eager``: the same PyTorch model in the same Serve deployment, with the same
batching and padding), each replica count (one thread each) and batching on
(``max_batch_size=--batch``) and off (1):

* closed loop: ``--clients`` HTTP clients, each sending its next one-row ``.npy`` request as
  soon as the last is answered, for ``--duration`` s: requests/s, p50 and p99 latency;
* open loop (``--rate`` > 0): requests sent at that fixed rate regardless of answers (latency
  counted from the scheduled send, so a falling-behind server shows in p99), same figures.

Offline: ``kiln.ray.map_batches`` over ``--offline`` inputs with 1 and 2 actors, items/s,
kiln vs eager. Every answer is checked against eager on a sample. The load generator runs
on the same machine as the replicas (it takes CPU from them); figures are for comparing
engines and settings within one run.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import tempfile
import threading
import time

PORT = 8472


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--models", default="resnet18,bert")
    ap.add_argument("--engines", default="kiln,eager")
    ap.add_argument("--replicas", default="1,2", help="replica counts, e.g. 1,2")
    ap.add_argument("--batch", type=int, default=8, help="max_batch_size with batching on (default 8)")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per closed/open-loop run")
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients")
    ap.add_argument("--rate", type=float, default=0.0, help="open-loop requests/s (0: skip the open loop)")
    ap.add_argument("--offline", type=int, default=10000, help="Ray Data inputs (0: skip)")
    ap.add_argument("--quick", action="store_true", help="small models, 1 replica, 2 s runs, 64 offline inputs (CI)")
    ap.add_argument("--json", metavar="FILE")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    return main_with(ap.parse_args(argv))


# -- models --------------------------------------------------------------------------------
def build(name: str, batch: int, quick: bool):
    """(eager model, example input tuple) for one row."""
    import kiln

    if name == "resnet18":
        return kiln.models.resnet18(batch=batch, image=32 if quick else 224, num_classes=10 if quick else 1000)
    if name == "bert":
        small = dict(layers=2, hidden=64, heads=4, ffn=128, vocab=1000, seq=32) if quick else {}
        return kiln.models.bert(batch=batch, **small)
    raise SystemExit(f"unknown model {name!r}: resnet18 or bert")


def save_artifact(name: str, max_batch: int, quick: bool, folder: str) -> str:
    import torch

    import kiln

    sizes = sorted({1 << k for k in range(max_batch.bit_length()) if 1 << k <= max_batch} | {max_batch})
    model, inputs = build(name, sizes[0], quick)
    t = time.perf_counter()
    fast = kiln.compile(model, inputs, threads=1)
    with torch.no_grad():
        for b in sizes[1:]:
            fast(*build(name, b, quick)[1])
    path = os.path.join(folder, f"{name}.kiln")
    kiln.save(fast, path)
    print(f"{name}: compiled for batch sizes {sizes} and saved in {time.perf_counter() - t:.0f} s", flush=True)
    return path


# -- load generators -----------------------------------------------------------------------
def _npy(arrays) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    if len(arrays) == 1:
        np.save(buf, arrays[0])
    else:
        np.savez(buf, *arrays)
    return buf.getvalue()


class _Client:
    def __init__(self):
        self.conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)

    def post(self, body: bytes) -> tuple[int, bytes]:
        try:
            self.conn.request("POST", "/", body=body)
            r = self.conn.getresponse()
            return r.status, r.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
            return 599, b""


def closed_loop(body: bytes, clients: int, duration: float) -> dict:
    lat, errors, stop = [], [0], time.perf_counter() + duration

    def run():
        c = _Client()
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status, _ = c.post(body)
            if status == 200:
                lat.append(time.perf_counter() - t)
            else:
                errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return _summary(lat, errors[0], time.perf_counter() - t0)


def open_loop(body: bytes, rate: float, duration: float) -> dict:
    import concurrent.futures

    lat, errors = [], [0]
    local = threading.local()

    def send(scheduled):
        c = getattr(local, "c", None) or _Client()
        local.c = c
        status, _ = c.post(body)
        if status == 200:
            lat.append(time.perf_counter() - scheduled)
        else:
            errors[0] += 1

    n = int(rate * duration)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        for i in range(n):
            at = t0 + i / rate
            time.sleep(max(0.0, at - time.perf_counter()))
            pool.submit(send, at)
    return _summary(lat, errors[0], time.perf_counter() - t0)


def _summary(lat: list, errors: int, seconds: float) -> dict:
    lat = sorted(lat)
    q = (lambda p: 1000 * lat[min(len(lat) - 1, int(p * len(lat)))]) if lat else (lambda p: float("nan"))
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / seconds, "p50_ms": q(0.50), "p99_ms": q(0.99)}


# -- runs ----------------------------------------------------------------------------------
def serve_runs(name, artifact, args, quick) -> list[dict]:
    import numpy as np
    from ray import serve

    import kiln.serving

    from kiln.bench.serve_eager import EagerServer
    eager_deployment = serve.deployment(name="kiln")(EagerServer)
    example = [x.numpy() for x in build(name, 1, quick)[1]]
    body = _npy(example)
    with __import__("torch").no_grad():
        ref = build(name, 1, quick)[0](*build(name, 1, quick)[1]).numpy()
    rows = []
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    for engine in args.engines.split(","):
        for replicas in (1,) if quick else [int(r) for r in args.replicas.split(",")]:
            for batch in (args.batch, 1):
                opts = dict(max_batch_size=batch, batch_wait_ms=args.batch_wait_ms, threads=1, replicas=replicas)
                if engine == "kiln":
                    app = kiln.serving.deployment(artifact, **opts)
                else:
                    app = eager_deployment.options(num_replicas=replicas, ray_actor_options={"num_cpus": 1},
                                                   max_ongoing_requests=2 * batch).bind(
                        os.path.abspath(artifact), batch, args.batch_wait_ms, 1, name, quick)
                serve.run(app, name="kiln", route_prefix="/")
                status, answer = _Client().post(body)
                out = np.load(io.BytesIO(answer)) if status == 200 else None
                out = out["arr_0"] if hasattr(out, "files") else out  # an .npz request is answered with .npz
                err = float(np.abs(out - ref).max()) if out is not None else float("nan")
                closed_loop(body, args.clients, min(2.0, args.duration))  # warm-up
                row = {"model": name, "engine": engine, "replicas": replicas, "max_batch_size": batch,
                       "max_err": err, "closed": closed_loop(body, args.clients, args.duration)}
                if args.rate > 0:
                    row["open"] = open_loop(body, args.rate, args.duration)
                print(json.dumps(row), flush=True)
                rows.append(row)
                serve.delete("kiln")
    return rows


def offline_runs(name, artifact, args, quick) -> list[dict]:
    import numpy as np
    import ray.data

    import kiln.ray

    from kiln.bench.serve_eager import EagerPredictor as eager_predictor
    example = [x.numpy() for x in build(name, 1, quick)[1]]
    n = args.offline
    columns = [f"in{i}" for i in range(len(example))]

    def inputs(batch):  # made inside the pipeline: n inputs never sit in the object store at once
        k = len(batch["id"])
        return {c: np.repeat(x, k, axis=0) for c, x in zip(columns, example)}

    rows = []
    for engine in args.engines.split(","):
        for actors in (1,) if quick else (1, 2):
            ds = ray.data.range(n).map_batches(inputs, batch_size=args.batch, batch_format="numpy")
            extra = {} if engine == "kiln" else {"predictor": eager_predictor,
                                                 "predictor_kwargs": {"name": name, "quick": quick}}
            t = time.perf_counter()
            out = kiln.ray.map_batches(ds, artifact, batch_size=args.batch, concurrency=actors, columns=columns,
                                       **extra)
            count = sum(len(b["output"]) for b in out.iter_batches(batch_size=256, batch_format="numpy"))
            seconds = time.perf_counter() - t
            row = {"model": name, "engine": engine, "actors": actors, "items": count,
                   "items_per_s": count / seconds, "seconds": seconds}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def markdown(res: dict) -> str:
    lines = ["| model | engine | replicas | max batch | closed req/s | p50 ms | p99 ms | open req/s | open p50 | open p99 | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["serve"]:
        c, o = r["closed"], r.get("open") or {}
        lines.append(f"| {r['model']} | {r['engine']} | {r['replicas']} | {r['max_batch_size']} | {c['rps']:.1f} | "
                     f"{c['p50_ms']:.1f} | {c['p99_ms']:.1f} | {o.get('rps', float('nan')):.1f} | "
                     f"{o.get('p50_ms', float('nan')):.1f} | {o.get('p99_ms', float('nan')):.1f} | "
                     f"{c['errors'] + o.get('errors', 0)} |")
    if res["offline"]:
        lines += ["", "| model | engine | actors | items | items/s |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['engine']} | {r['actors']} | {r['items']} | {r['items_per_s']:.1f} |"
                  for r in res["offline"]]
    return "\n".join(lines) + "\n"


def main_with(args) -> int:
    import ray

    quick = args.quick
    if quick:
        args.duration, args.offline, args.clients = min(args.duration, 2.0), min(args.offline, 64), min(args.clients, 4)
        args.models = args.models.split(",")[0]
    res = {"settings": {k: v for k, v in vars(args).items() if k != "fn"}, "serve": [], "offline": []}
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with tempfile.TemporaryDirectory(prefix="kiln-bench-serve-") as folder:
            for name in args.models.split(","):
                artifact = save_artifact(name, args.batch, quick, folder)
                res["serve"] += serve_runs(name, artifact, args, quick)
                if args.offline:
                    res["offline"] += offline_runs(name, artifact, args, quick)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
