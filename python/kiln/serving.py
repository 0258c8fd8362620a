"""A saved Kiln artifact behind a Ray Serve endpoint, with request batching.

    app = kiln.serving.deployment("model.kiln", max_batch_size=8, batch_wait_ms=5, replicas=2)
    serve.run(app, name="kiln", route_prefix="/")

Each replica loads the artifact once (``kiln.load`` in its constructor: an artifact that
does not load fails the deployment at start with the ``KilnError``, not at the first
request). Requests are batched by ``@serve.batch`` and run by ``kiln.batching.Batcher``:
grouped by shape, cut and padded to the batch sizes the artifact was saved with, and
answered individually (see that module for what this assumes of the model).

HTTP: ``POST /`` with JSON (``{"inputs": ...}``), ``.npy`` or ``.npz`` bodies; the answer is
JSON (``{"output": ...}`` or ``{"outputs": [...]}``) for a JSON request, ``.npy``/``.npz``
otherwise. A body that cannot be run gets 400 with ``{"error": message}``; a model error
500. ``GET /health`` and ``GET /info`` (the artifact's manifest and the serving settings).
In-cluster callers use the handle: ``serve.get_app_handle("kiln").predict.remote(x)``.

This module imports Ray; ``import kiln`` never imports it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os

from ray import serve

from .batching import BadRequest, Batcher, array_response, json_response, parse_body
from .errors import KilnError

# Serve's default cap on requests queued at one replica is below a useful batch; a replica
# takes this many batches' worth so the next batch fills while one runs.
_QUEUED_BATCHES = 2


class Replica:
    """One replica: the artifact loaded once, a batching queue, one model run at a time."""

    def __init__(self, artifact: str, max_batch_size: int = 8, batch_wait_ms: float = 5.0, threads: int = 1):
        import ray
        import torch

        from kiln.artifact import info
        from kiln.options import configure_tvm_environment

        configure_tvm_environment(threads)  # before the TVM pool exists: it is sized once
        torch.set_num_threads(threads)
        self.batcher = self.make_batcher(artifact)
        manifest = info(artifact)
        manifest.pop("member_bytes", None)
        self.info = {"artifact": artifact, "manifest": manifest,
                     "serving": {"max_batch_size": max_batch_size, "batch_wait_ms": batch_wait_ms,
                                 "threads": threads, "serves": self.batcher.describe(), "pid": os.getpid(),
                                 "replica": ray.get_runtime_context().get_actor_name()}}
        # the model runs off the event loop, so requests keep queueing (and batching) meanwhile
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kiln-model")
        self.batched.set_max_batch_size(max_batch_size)
        self.batched.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

    def make_batcher(self, artifact: str) -> Batcher:
        """The loaded artifact in a Batcher (a subclass may serve another model with the
        artifact's signatures: the benchmark's eager baseline does)."""
        from kiln.artifact import load

        return Batcher(load(artifact))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def batched(self, requests: list) -> list:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.batcher.run, requests)

    async def predict(self, *arrays):
        """The handle's call: numpy arrays (one per input, with the batch dim) in, the list
        of output arrays out (one array for a one-output model). Raises BadRequest."""
        result = await self.batched(self.batcher.check(arrays))
        if isinstance(result, Exception):
            raise result
        return result[0] if len(result) == 1 else result

    async def __call__(self, request):
        from starlette.responses import JSONResponse, PlainTextResponse, Response

        path = request.url.path.rstrip("/")
        if request.method == "GET":
            if path.endswith("/health"):
                return PlainTextResponse("ok")
            if path.endswith("/info"):
                return JSONResponse(self.info)
            return JSONResponse({"error": "POST a JSON, .npy or .npz body to run the model; GET /health, /info"}, 404)
        try:
            arrays, fmt = parse_body(await request.body(), self.batcher.n_inputs)
            inputs = self.batcher.check(arrays)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, 400)
        result = await self.batched(inputs)
        if isinstance(result, Exception):
            return JSONResponse({"error": f"{type(result).__name__}: {result}"}, 500)
        if fmt == "json":
            return JSONResponse(json_response(result))
        return Response(array_response(result, fmt), media_type="application/octet-stream")


KilnServer = serve.deployment(name="kiln")(Replica)  # the Serve deployment; Replica stays subclassable


def deployment(artifact, *, max_batch_size: int = 8, batch_wait_ms: float = 5.0, threads: int = 1,
               replicas: int = 1, name: str = "kiln", ray_actor_options: dict | None = None,
               constructor_retries: int = 1):
    """The Ray Serve application (a bound deployment) serving ``artifact``: pass it to
    ``serve.run``, or to another deployment's ``bind`` to compose it.

    ``max_batch_size`` requests are batched within ``batch_wait_ms``; each replica runs the
    model with ``threads`` threads and reserves that many CPUs from Ray (override with
    ``ray_actor_options``). The artifact's manifest is checked here (a missing or foreign
    file raises ``KilnError`` at once); the path must be readable by every replica (on a
    multi-machine cluster: shared storage or the same path on each node). A replica whose
    load fails is retried ``constructor_retries`` times before the deployment fails."""
    from kiln.artifact import info

    path = os.path.abspath(os.fspath(artifact))
    info(path)
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise KilnError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
    if not isinstance(threads, int) or threads < 1:
        raise KilnError(f"threads must be a positive int, got {threads!r}")
    if batch_wait_ms < 0:
        raise KilnError(f"batch_wait_ms must be >= 0, got {batch_wait_ms!r}")
    actor = {"num_cpus": threads, **(ray_actor_options or {})}
    d = KilnServer.options(name=name, num_replicas=replicas, ray_actor_options=actor,
                           max_ongoing_requests=_QUEUED_BATCHES * max_batch_size,
                           max_constructor_retry_count=constructor_retries)
    return d.bind(path, max_batch_size, float(batch_wait_ms), threads)


def start(app, *, name: str = "kiln", route_prefix: str = "/"):
    """``serve.run(app)``, with a replica's ``KilnError`` (an artifact that does not load)
    raised here as the ``KilnError`` itself rather than Serve's generic deploy failure.
    Returns the app's handle."""
    try:
        return serve.run(app, name=name, route_prefix=route_prefix)
    except RuntimeError as e:
        why = _replica_error(name)
        if why:
            raise KilnError(f"the deployment {name!r} failed to start: {why}") from None
        raise KilnError(f"the deployment {name!r} failed to start: {e}") from e


def _replica_error(name: str) -> str | None:
    """The KilnError line of a failed replica's constructor traceback, from Serve's status."""
    try:
        app = serve.status().applications.get(name)
    except Exception:  # noqa: BLE001  (the controller may be gone: nothing to add)
        return None
    for d in (app.deployments.values() if app else ()):
        lines = [ln for ln in (d.message or "").splitlines() if ln.startswith("kiln.errors.KilnError: ")]
        if lines:
            return lines[-1].split(": ", 1)[1]
    return None


def run(artifact, *, address: str | None = None, port: int = 8000, host: str = "127.0.0.1",
        route_prefix: str = "/", name: str = "kiln", **keywords):
    """Start (or join, with ``address``) a Ray cluster, start Serve's HTTP proxy on
    ``host:port`` and deploy ``artifact`` (keywords as ``deployment``). Returns the app's
    handle once every replica has loaded the artifact; ``KilnError`` when one cannot."""
    import ray

    app = deployment(artifact, name=name, **keywords)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    return start(app, name=name, route_prefix=route_prefix)
