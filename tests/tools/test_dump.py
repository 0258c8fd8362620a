"""kiln dump: every format for the example models and an ONNX file, stages, diff, stats."""
import os
import re
import shutil
import subprocess

import pytest
import torch

from kiln import dump as D
from kiln import models
from kiln.cli import main
from kiln.ir import from_json, structural_hash

EXAMPLES = ["resnet18", "bert", "lstm"]


@pytest.fixture(scope="module")
def final_graphs():
    return {name: D.run_stages(D.import_model(name))[-1].graph for name in EXAMPLES}


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    model, inputs = models.resnet18(image=64)
    path = tmp_path_factory.mktemp("onnx") / "resnet18.onnx"
    with torch.no_grad():
        torch.onnx.export(model, inputs, str(path), opset_version=17, dynamo=False)
    return str(path)


# BERT's graphs are the largest to print in every format: `make test-slow` (CI runs it)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "bert" else n for n in EXAMPLES])
def test_every_format_for_example_models(final_graphs, name):
    g = final_graphs[name]
    text = D.render(g, "text")
    assert text.startswith(f"graph @{name}(") and len(text.splitlines()) > len(g.nodes)
    j = D.render(g, "json")
    g2 = from_json(j)
    assert structural_hash(g2) == structural_hash(g) and D.render(g2, "json") == j  # JSON round-trips
    dot = D.render(g, "dot")
    assert dot.startswith("digraph") and dot.count(" -> ") >= len(g.nodes) - 1
    svg = D.render(g, "svg")
    assert svg.count('<g class="node"') == len(g.nodes) + len(g.inputs)
    html = D.render(g, "html")
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")  # self-contained


def test_onnx_and_torch_give_the_same_view(onnx_file):
    g_onnx = D.run_stages(D.import_model(onnx_file))[-1].graph
    model, inputs = models.resnet18(image=64)
    from kiln.frontends.torch_export import export_program, from_exported

    g_torch = D.run_stages(from_exported(export_program(model, inputs)).graph)[-1].graph
    assert g_onnx.op_counts() == g_torch.op_counts()
    for fmt in D.FORMATS:
        assert D.render(g_onnx, fmt)


def test_cli_output_file_stages_and_each_pass(tmp_path, capsys):
    out = tmp_path / "r.dot"
    assert main(["dump", "lstm", "-f", "dot", "-o", str(out)]) == 0
    assert out.read_text().startswith("digraph")
    assert main(["dump", "lstm", "--before", "rnn"]) == 0
    before = capsys.readouterr().out
    assert main(["dump", "lstm", "--after", "rnn"]) == 0
    after = capsys.readouterr().out
    assert before.count("= lstm(") == 1 and after.count("= lstm(") == 2  # the pass split the layers
    d = tmp_path / "passes"
    assert main(["dump", "lstm", "--each-pass", str(d), "-f", "json"]) == 0
    files = sorted(os.listdir(d))
    assert files[0] == "00_input.json" and any("rnn" in f for f in files)
    for f in files:
        from_json((d / f).read_text())
    assert main(["dump", "lstm", "--after", "no_such_pass"]) == 2
    assert "no pass or phase" in capsys.readouterr().err


def test_diff_shows_conv_bn_folding(capsys):
    assert main(["dump", "resnet18", "--diff", "input", "fold_bn"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"batch_norm\s+20 -> 0\s+\(-20\)", out)
    assert any(line.startswith("-") and "batch_norm(" in line for line in out.splitlines())


def test_stats(capsys):
    assert main(["dump", "bert", "--stats"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line and line.split()[0] != "op"}
    # per layer one fused Q/K/V GEMM (sliced three ways), the output projection, two FFN GEMMs; the pooler reads
    # token 0, so the last layer computes that token only: its query GEMM takes one token (a slice of the layer's
    # input, also its residual), keys and values the whole sequence as one GEMM (sliced two ways)
    assert lines["attention"][1] == "12" and lines["linear"][1] == "51" and lines["slice"][1] == "36"
    assert int(lines["total"][2].replace(",", "")) > 100_000_000  # BERT-base parameters
    assert "kernel groups:" in out and "fallbacks: 0" in out


def test_saved_graph_is_a_model_source(tmp_path, capsys, final_graphs):
    p = tmp_path / "g.json"
    p.write_text(D.render(final_graphs["lstm"], "json"))
    assert main(["dump", str(p), "--stats"]) == 0
    assert "lstm" in capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian package 'chromium')")
@pytest.mark.parametrize("name", EXAMPLES)
def test_html_loads_in_headless_chromium(final_graphs, tmp_path, name):
    g = final_graphs[name]
    page = tmp_path / f"{name}.html"
    page.write_text(D.render(g, "html"))
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom, "the page's script did not run to the end"
    assert "data-errors" not in dom
    m = re.search(r'<span id="node-count">(\d+)</span>', dom)
    assert m and int(m.group(1)) == len(g.nodes)
