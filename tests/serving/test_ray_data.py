"""kiln.ray.map_batches over Ray Data on a local cluster, checked against eager."""
import numpy as np
import pytest
import torch

from serving_fixtures import artifact, ray_cluster, small_model  # noqa: F401  (fixtures)


def test_map_batches_matches_eager(ray_cluster, artifact, small_model):
    """27 rows in batches of 6 (cut into the artifact's plans of 4 and 1, the tail padded),
    two actors; an id column passes through so each output row is matched to its input."""
    import ray.data

    import kiln.ray

    x = np.random.default_rng(0).standard_normal((27, 3, 8, 8), dtype=np.float32)
    ds = ray.data.from_items([{"id": i, "image": x[i]} for i in range(len(x))])
    out = kiln.ray.map_batches(ds, artifact, batch_size=6, concurrency=2, columns=["image"], num_cpus=0.5)
    rows = out.take_all()
    assert len(rows) == len(x) and set(rows[0]) == {"id", "output"}
    got = np.stack([r["output"] for r in sorted(rows, key=lambda r: r["id"])])
    with torch.no_grad():
        ref = small_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_map_batches_refuses_a_missing_artifact(ray_cluster, tmp_path):
    import ray.data

    import kiln.ray
    from kiln.errors import KilnError

    with pytest.raises(KilnError):
        kiln.ray.map_batches(ray.data.range(3), tmp_path / "missing.kiln")


# kept out of `make test`'s time budget on 2 cores: Ray Data on a local cluster: `make test-slow`, which CI runs
pytestmark = pytest.mark.slow
