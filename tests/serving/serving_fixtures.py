"""A small compiled model saved as an artifact, and a local Ray cluster for the tests here
(imported by each test module: a conftest.py here would shadow tests/conftest.py, whose
helpers other test folders import as ``conftest``).

The cluster starts once per test module (``ray.init(num_cpus=2)``, no dashboard) and the
tests that need it skip, with the reason, when Ray is not installed or does not start."""
import pytest
import torch
from torch import nn


class SmallNet(nn.Module):
    """Conv, ReLU, pooling and a linear head: rows are independent (batchable)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


BATCH_SIZES = (1, 4)  # the plans the artifact holds


@pytest.fixture(scope="session")
def small_model():
    torch.manual_seed(0)
    return SmallNet().eval()


@pytest.fixture(scope="session")
def artifact(small_model, tmp_path_factory):
    """model.kiln holding plans for batch 1 and batch 4 of float32[B, 3, 8, 8]."""
    import kiln

    fast = kiln.compile(small_model, (torch.randn(BATCH_SIZES[0], 3, 8, 8),))
    for b in BATCH_SIZES[1:]:
        fast(torch.randn(b, 3, 8, 8))
    path = tmp_path_factory.mktemp("serving") / "small.kiln"
    kiln.save(fast, path)
    return str(path)


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kiln[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except Exception as e:  # noqa: BLE001  (Ray raises many types when it cannot start)
        pytest.skip(f"a local Ray cluster does not start here: {type(e).__name__}: {e}")
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
