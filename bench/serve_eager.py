"""The eager baseline of ``kiln bench serve``: Kiln's Serve replica and Ray Data actor with
the artifact's signatures (so the same batching, padding and transport) but the PyTorch
model behind them. Imports Ray; module-level classes so Ray ships them by reference."""
from __future__ import annotations

from kiln.bench.serve import build
from kiln.ray import KilnPredictor
from kiln.serving import Replica


def eager_batcher(artifact: str, name: str, quick: bool):
    import kiln
    from kiln.batching import Batcher, signatures

    return Batcher(build(name, 1, quick)[0], signatures(kiln.load(artifact)))


class EagerServer(Replica):
    def __init__(self, artifact, max_batch_size, batch_wait_ms, threads, name, quick):
        self.name, self.quick = name, quick
        super().__init__(artifact, max_batch_size, batch_wait_ms, threads)

    def make_batcher(self, artifact):
        return eager_batcher(artifact, self.name, self.quick)


class EagerPredictor(KilnPredictor):
    def __init__(self, artifact, name, quick, **kw):
        self.name, self.quick = name, quick
        super().__init__(artifact, **kw)

    def make_batcher(self, artifact):
        return eager_batcher(artifact, self.name, self.quick)
