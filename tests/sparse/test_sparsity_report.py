"""kiln.sparsity_report and `kiln sparsity-report`."""
from __future__ import annotations

import torch

import kiln
from kiln.cli import main


def test_report_lists_layers_and_end_to_end_numbers():
    from kiln.bench.sparse import mlp

    model, (x,) = mlp()
    pruned = kiln.sparsify(model, 0.9, "block(4,4)", layers=["0", "2"])
    data = [(x, model(x).argmax(-1))]
    rep = kiln.sparsity_report(pruned, (x,), dense_model=model, data=data, sparse="bsr", repeats=2)
    assert [d.shape for d in rep.layers] == [(1024, 256), (256, 1024)]
    assert all(d.format == "bsr[4, 4]" and abs(d.sparsity - 0.9) < 0.01 for d in rep.layers)
    assert rep.dense_ms > 0 and rep.sparse_ms > 0
    assert rep.max_output_diff < 1e-3  # same weights: only summation order differs
    assert rep.pruning_error > 0  # pruning did change the outputs
    assert rep.accuracy["dense model (eager)"] == 1.0
    assert rep.accuracy["pruned model (kiln, sparse kernels)"] == rep.accuracy["pruned model (eager)"]
    text = str(rep)
    assert "bsr[4, 4]" in text and "end to end" in text and "top-1" in text


def test_report_auto_measures_each_layer():
    from kiln.bench.sparse import mlp

    model, (x,) = mlp()
    pruned = kiln.sparsify(model, 0.9, "block(4,4)", layers=["0", "2"])
    rep = kiln.sparsity_report(pruned, (x,), repeats=2)
    for d in rep.layers:
        assert d.dense_ms is not None and d.dense_ms > 0 and set(d.sparse_ms) >= {"csr", "bsr[4, 4]"}
        assert d.format in ("dense", "csr") or d.format.startswith("bsr")


def test_cli(capsys):
    torch.manual_seed(0)
    rc = main(["sparsity-report", "kiln.bench.sparse:mlp", "--sparsity", "0.8", "--pattern", "block(4,4)",
               "--layers", "0,2", "--sparse", "bsr", "--repeats", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "sparsity report" in out and "bsr[4, 4]" in out and "pruning:" in out
