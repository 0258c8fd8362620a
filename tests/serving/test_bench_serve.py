"""``python -m kiln.bench.serve --quick`` runs end to end and writes well-formed output
(nothing about speed is asserted). Marked ``bench``: ``make bench-smoke``."""
import json
import subprocess
import sys

import pytest


@pytest.mark.bench
def test_bench_serve_quick(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'kiln[ray]')")
    out = tmp_path / "serve.json"
    p = subprocess.run([sys.executable, "-m", "kiln.bench.serve", "--quick", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {(r["engine"], r["max_batch_size"]) for r in res["serve"]} == {("kiln", 8), ("kiln", 1), ("eager", 8), ("eager", 1)}
    for r in res["serve"]:
        assert r["max_err"] < 1e-3 and r["closed"]["requests"] > 0 and r["closed"]["errors"] == 0, r
    assert [(r["engine"], r["items"]) for r in res["offline"]] == [("kiln", 64), ("eager", 64)]
    assert "| resnet18 | kiln | 1 | 8 |" in p.stdout
