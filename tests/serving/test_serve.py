"""kiln.serving on a local Ray cluster: concurrent requests against eager, the 400 path,
/health and /info, the handle, a failed load, and a killed replica with traffic continuing.

One application (2 replicas, half a CPU each) is deployed once for the module."""
import io
import json
import threading
import time
import urllib.error
import urllib.request
import zipfile

import numpy as np
import pytest
import torch

from serving_fixtures import artifact, ray_cluster, small_model  # noqa: F401  (fixtures)

PORT = 8471


@pytest.fixture(scope="module")
def app(ray_cluster, artifact):
    from ray import serve

    import kiln.serving

    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    d = kiln.serving.deployment(artifact, max_batch_size=4, batch_wait_ms=20, replicas=2,
                                ray_actor_options={"num_cpus": 0.5})
    handle = serve.run(d, name="kiln", route_prefix="/")
    yield handle
    serve.delete("kiln")


def _post(body: bytes, path="/", timeout=60):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _get(path):
    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}{path}", timeout=30) as r:
        return r.status, r.read()


def _npy(x) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def _eager(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ask(x, as_npy: bool):
    """(status, output array or None)."""
    if as_npy:
        status, body = _post(_npy(x))
        return status, np.load(io.BytesIO(body)) if status == 200 else None
    status, body = _post(json.dumps({"inputs": x.tolist()}).encode())
    return status, np.asarray(json.loads(body)["output"], np.float32) if status == 200 else None


def test_concurrent_requests_match_eager(app, small_model):
    """12 threads, 3 requests each, 1 to 3 rows, JSON and .npy: every answer is eager's."""
    failures, done = [], []

    def client(seed):
        rng = np.random.default_rng(seed)
        for k in range(3):
            x = rng.standard_normal((int(rng.integers(1, 4)), 3, 8, 8), dtype=np.float32)
            status, y = _ask(x, as_npy=(seed + k) % 2 == 0)
            ref = _eager(small_model, x)
            if status != 200 or y.shape != ref.shape or not np.allclose(y, ref, rtol=1e-4, atol=1e-4):
                failures.append((seed, k, status))
            done.append(1)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(done) == 36 and not failures, failures


def test_bad_bodies_get_400_and_the_replica_keeps_serving(app, small_model):
    cases = [(b"{not json", "neither JSON"),
             (json.dumps({"inputs": np.zeros((1, 3, 9, 8)).tolist()}).encode(), "match no saved plan"),
             (_npy(np.zeros((1, 3, 8, 8), np.complex64)), "numeric"),
             (_npy(np.zeros((2, 3, 8), np.float32)), "match no saved plan"),
             (b"\x93NUMPY\x01\x00garbage", "cannot be read")]
    for body, msg in cases:
        status, answer = _post(body)
        assert status == 400, (msg, status, answer)
        assert msg in json.loads(answer)["error"]
    x = np.ones((2, 3, 8, 8), np.float32)
    status, y = _ask(x, as_npy=True)
    assert status == 200 and np.allclose(y, _eager(small_model, x), rtol=1e-4, atol=1e-4)


def test_health_info_and_handle(app, small_model, artifact):
    assert _get("/health") == (200, b"ok")
    status, body = _get("/info")
    info = json.loads(body)
    assert status == 200 and info["manifest"]["format"] == "kiln-artifact"
    assert info["serving"]["max_batch_size"] == 4 and info["serving"]["serves"].startswith("(float32[B, 3, 8, 8])")
    x = np.random.default_rng(1).standard_normal((3, 3, 8, 8), dtype=np.float32)
    y = app.predict.remote(x).result(timeout_s=60)
    np.testing.assert_allclose(y, _eager(small_model, x), rtol=1e-4, atol=1e-4)


def test_failed_load_fails_the_deployment_at_start(ray_cluster, artifact, tmp_path):
    """A damaged artifact (its manifest reads, its weights do not) fails the deployment at
    start with the KilnError from the replica's kiln.load, not at the first request."""
    from ray import serve

    import kiln.serving
    from kiln.errors import KilnError

    with zipfile.ZipFile(artifact) as z:
        info = z.getinfo("weights.safetensors")
    data = bytearray(open(artifact, "rb").read())
    n, e = (int.from_bytes(data[info.header_offset + k:info.header_offset + k + 2], "little") for k in (26, 28))
    data[info.header_offset + 30 + n + e + info.file_size - 3] ^= 0x40  # inside the last weight
    bad = tmp_path / "damaged.kiln"
    bad.write_bytes(bytes(data))
    d = kiln.serving.deployment(bad, name="damaged", ray_actor_options={"num_cpus": 0.25}, constructor_retries=1)
    with pytest.raises(KilnError, match=r"'damaged' failed to start: .*damaged.kiln: weight .* fails its checksum"):
        kiln.serving.start(d, name="damaged", route_prefix="/damaged")
    assert "fails its checksum" in serve.status().applications["damaged"].deployments["damaged"].message
    serve.delete("damaged")
    with pytest.raises(KilnError, match="missing.kiln"):  # a missing file: at once, in the caller
        kiln.serving.deployment(tmp_path / "missing.kiln")


def test_killed_replica_traffic_continues(app, ray_cluster, small_model):
    """Kill one of the two replicas under load: every answer is eager's or an error status
    (never a wrong answer), requests after the kill succeed, and Serve starts a new replica."""
    from ray import serve

    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8), dtype=np.float32)
    ref = _eager(small_model, x)
    results, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            status, y = _ask(x, as_npy=True)
            results.append((status, None if y is None else bool(np.allclose(y, ref, rtol=1e-4, atol=1e-4))))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = json.loads(_get("/info")[1])["serving"]["replica"]
    ray_cluster.kill(ray_cluster.get_actor(victim, namespace="serve"), no_restart=True)
    killed_at = len(results)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join()
    assert all(ok for status, ok in results if status == 200), "a wrong answer"
    assert all(status >= 500 for status, ok in results if status != 200), results
    after = results[killed_at:]
    assert any(status == 200 for status, _ in after[len(after) // 2:]), after
    deadline, seen = time.monotonic() + 90, set()
    while time.monotonic() < deadline:  # Serve replaces the replica (a new actor loads the artifact)
        seen.add(json.loads(_get("/info")[1])["serving"]["replica"])
        if _running(serve, 2) and len(seen - {victim}) == 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no replacement replica within 90 s: answered by {seen}, status {serve.status()}")
    status, y = _ask(x, as_npy=True)
    assert status == 200 and np.allclose(y, ref, rtol=1e-4, atol=1e-4)


def _running(serve, replicas: int) -> bool:
    d = serve.status().applications["kiln"].deployments["kiln"]
    return str(d.status).endswith("HEALTHY") and \
        sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING")) == replicas


# kept out of `make test`'s time budget on 2 cores: Ray Serve deployments (a local cluster per module): `make test-slow`, which CI runs
pytestmark = pytest.mark.slow
