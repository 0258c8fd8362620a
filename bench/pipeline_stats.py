"""Node and kernel-group counts before/after the pass pipeline, and its time, per model.

    python bench/pipeline_stats.py [resnet18 bert lstm ...]
"""
from __future__ import annotations

import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main(names):
    from kiln import models
    from kiln.frontends.torch_export import export_program, from_exported
    from kiln.passes.partition import partition
    from kiln.passes.pipeline import run_pipeline

    print(f"{'model':<10} {'nodes in':>9} {'groups in':>10} {'nodes out':>10} {'groups out':>11} {'pipeline ms':>12}")
    for name in names:
        model, inputs = models.get(name)
        g = from_exported(export_program(model, inputs), name).graph
        before_groups = len(partition(g).groups)
        t = time.perf_counter()
        res = run_pipeline(g)
        ms = (time.perf_counter() - t) * 1e3
        print(f"{name:<10} {len(g.nodes):>9} {before_groups:>10} {len(res.graph.nodes):>10} "
              f"{len(res.partition.groups):>11} {ms:>12.1f}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["resnet18", "bert", "lstm"])
