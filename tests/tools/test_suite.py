"""``kiln bench suite``: the checks it makes and the report it writes.

The whole quick suite (every model's tiny config compiled and checked against eager) runs
here too: that is a correctness test of 26 architectures, not a benchmark (no timing)."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree

from kiln.bench import suite, suite_models
from kiln.bench.suite_report import markdown, plot, summarize


def test_compare_takes_the_worst_output_relative_to_its_scale():
    want = {"a": torch.tensor([100.0, -200.0]), "b": (torch.tensor([1.0]), torch.tensor([3]))}
    got = {"a": torch.tensor([100.0, -200.01]), "b": (torch.tensor([1.001]), torch.tensor([3]))}
    r = suite.compare(got, want)
    assert r["rel"] == pytest.approx(1e-3, rel=1e-3) and r["scale"] == 1.0  # b: 1e-3 of 1 beats a: 5e-5 of 200
    assert suite.compare({"a": torch.tensor([1.0]), "b": torch.tensor([2])},
                         {"a": torch.tensor([1.0]), "b": torch.tensor([3])})["rel"] == math.inf
    assert "shape" in suite.compare(torch.zeros(2), torch.zeros(3))["why"]
    assert "output tensors" in suite.compare((torch.zeros(2),), (torch.zeros(2), torch.zeros(2)))["why"]


def _fake_outputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ref = {"logits": torch.randn(4, 1000, generator=g, dtype=torch.float64),
           "cache": (torch.randn(2, 64, 32, generator=g, dtype=torch.float64), torch.arange(6))}
    eager = {"logits": ref["logits"].bfloat16(), "cache": (ref["cache"][0].bfloat16(), ref["cache"][1])}
    return ref, eager


def _scaled_error(ref, eager, k):
    """A result k times as far from ``ref`` as eager bf16 is, on every floating output."""
    return {"logits": (ref["logits"] + k * (eager["logits"].double() - ref["logits"])).float(),
            "cache": ((ref["cache"][0] + k * (eager["cache"][0].double() - ref["cache"][0])).float(),
                      ref["cache"][1])}


def test_bf16_check_is_torchs_rule_against_an_fp64_run():
    ref, eager = _fake_outputs()
    good = suite.bf16_check(_scaled_error(ref, eager, 2.0), eager, ref)
    assert good["pass"], good
    assert good["kiln_rmse"] == pytest.approx(2 * good["eager_bf16_rmse"], rel=1e-6)
    assert len(good["outputs"]) == 2  # both floating outputs reported; the integer one compared exactly
    assert suite.bf16_check({k: v for k, v in eager.items()}, eager, ref)["pass"]  # eager bf16 itself passes
    # four times eager's error is past 3x + 1e-4 (eager's RMSE on unit normals is about 1e-3)
    far = suite.bf16_check(_scaled_error(ref, eager, 4.0), eager, ref)
    assert not far["pass"] and far["kiln_rmse"] > far["bound"], far
    # a model that amplifies rounding: eager bf16 itself 10% off, Kiln 12% off: passes
    noisy = {"logits": (ref["logits"] + 0.1 * torch.randn(4, 1000, dtype=torch.float64)).bfloat16(),
             "cache": eager["cache"]}
    kiln = {"logits": (ref["logits"] + 0.12 * torch.randn(4, 1000, dtype=torch.float64)).float(),
            "cache": (eager["cache"][0].float(), ref["cache"][1])}
    assert suite.bf16_check(kiln, noisy, ref)["pass"]


def test_bf16_check_pools_each_output_over_the_draws():
    # two logits per draw (a sequence classifier): the RMSE of each engine is over every
    # draw's logits together, exactly as one check over the concatenated outputs
    g = torch.Generator().manual_seed(3)
    refs = [{"logits": torch.randn(1, 2, generator=g, dtype=torch.float64)} for _ in range(4)]
    eagers = [{"logits": (r["logits"] + 1e-3 * torch.randn(1, 2, generator=g, dtype=torch.float64)).bfloat16()}
              for r in refs]
    gots = [{"logits": (r["logits"] + 1e-3 * torch.randn(1, 2, generator=g, dtype=torch.float64)).float()}
            for r in refs]
    pooled = suite.bf16_check_draws(gots, eagers, refs)
    flat = [torch.cat([d["logits"].reshape(-1) for d in x]) for x in (gots, eagers, refs)]
    one = suite.bf16_check(*flat)
    assert pooled["draws"] == 4 and pooled["pass"] == one["pass"]
    assert pooled["kiln_rmse"] == pytest.approx(one["kiln_rmse"]) and pooled["bound"] == pytest.approx(one["bound"])
    assert pooled["kiln_rmse"] == pytest.approx(suite_check_rmse(flat[2], flat[0]))
    # a wrong draw fails the whole check, and a draw whose structure differs is named
    wrong = gots[:3] + [{"logits": gots[3]["logits"] + 0.5}]
    assert not suite.bf16_check_draws(wrong, eagers, refs)["pass"]
    bad = suite.bf16_check_draws(gots[:3] + [{"logits": gots[3]["logits"].reshape(2, 1)}], eagers, refs)
    assert not bad["pass"] and bad["why"].startswith("draw 3")
    assert not suite.bf16_check_draws(gots[:3], eagers, refs)["pass"]


def suite_check_rmse(a, b):
    return float(((a.double() - b.double()) ** 2).mean().sqrt())


def test_a_wrong_bf16_result_fails_the_check():
    ref, eager = _fake_outputs()
    right = _scaled_error(ref, eager, 1.0)
    wrong = [
        {**right, "logits": right["logits"] * 1.05},  # 5% off everywhere
        {**right, "logits": right["logits"].flip(0)},  # rows swapped
        {**right, "cache": (right["cache"][0] + 0.01, right["cache"][1])},  # only the cache is off
        {**right, "cache": (right["cache"][0], right["cache"][1] + 1)},  # an integer output differs
        {**right, "logits": torch.full_like(right["logits"], float("nan"))},
        {**right, "logits": right["logits"][:3]},  # wrong shape
    ]
    for i, got in enumerate(wrong):
        assert not suite.bf16_check(got, eager, ref)["pass"], i


def test_the_suite_fails_a_model_whose_bf16_result_is_wrong(monkeypatch):
    # the whole path of a bf16 row (eager bf16, the fp64 run, the check) with a fake compile
    # whose result is 2% off: it must be a failed row, and the honest result a passing one
    import kiln

    class Fake:
        def __init__(self, model, factor):
            self.model, self.factor = model, factor
            self.report = type("R", (), {"fallbacks": []})()

        def __call__(self, *args):
            with torch.no_grad():
                out = self.model(*args)
            return pytree.tree_map(lambda t: t * self.factor if isinstance(t, torch.Tensor) else t, out)

    for factor, status in ((1.02, "fail"), (1.0, "pass")):
        monkeypatch.setattr(kiln, "compile", lambda model, inputs, factor=factor, **kw: Fake(model, factor))
        row = suite.run_model("resnet", "bf16", quick=True, inductor=False, timing=False)
        assert row["status"] == status, (factor, row.get("bf16_check"), row.get("error"))
        assert row["bf16_check"]["reference"] == "fp64"
        assert row["bf16_check"]["eager_bf16_rmse"] > 0


def _row(model, suite_, status, eager, ind, kiln, fallbacks=None, prec="fp32"):
    return {"model": model, "suite": suite_, "precision": prec, "status": status, "fallbacks": fallbacks or {},
            "compile_s": {"kiln_cold": 4.0, "inductor": 16.0}, "rel_err": 1e-6,
            "latency_ms": {"1": {"eager": eager, "inductor": ind, "kiln": kiln}}}


def test_summary_is_a_geomean_over_passing_models(tmp_path):
    rows = [_row("a", "text", "pass", 4.0, 2.0, 1.0), _row("b", "text", "pass", 9.0, 3.0, 1.0, {"aten.cumsum": 1}),
            _row("c", "text", "fail", 100.0, 1.0, 1.0), _row("d", "vision", "error", 0, 0, 0)]
    rows[3]["latency_ms"] = {}
    res = {"quick": False, "precisions": ["fp32"], "threads": [1], "repeats": 3, "date": "d", "torch": "t", "rows": rows}
    res["summary"] = summarize(res)
    text = {s["suite"]: s for s in res["summary"]}["text"]
    assert (text["passed"], text["models"], text["no_fallbacks"]) == (2, 3, 2)
    assert text["geomean_vs_eager@1"] == pytest.approx(6.0)  # sqrt(4 * 9); c failed and does not count
    assert text["geomean_vs_inductor@1"] == pytest.approx(math.sqrt(6.0))
    assert text["geomean_kiln_compile_s"] == pytest.approx(4.0)
    every = {s["suite"]: s for s in res["summary"]}["all"]
    assert (every["passed"], every["models"]) == (2, 4)
    md = markdown(res)
    assert "| b | text | fp32 | pass |" in md and "cumsum x1" in md and "text fp32: pass 2/3" in md
    plot(res, str(tmp_path / "s.png"))
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_every_listed_model_builds_from_its_config_without_downloads():
    assert len(suite_models.MODELS) == 26 and set(suite_models.SUITES) == {
        "text", "decoder", "speech", "vision", "timeseries"}
    model, inputs = suite_models.build("resnet", quick=True)
    again, inputs2 = suite_models.build("resnet", quick=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert torch.equal(inputs[0], inputs2[0])  # seeded: every run checks the same model


# the quick suite, model by model: each must compile and match eager (fallbacks allowed)
@pytest.mark.parametrize("name", [m.name for m in suite_models.MODELS])
def test_quick_suite_model_matches_eager(name):
    row = suite.run_model(name, quick=True, inductor=False, timing=False)
    assert row["status"] == "pass", (row.get("error"), row.get("rel_err"), row.get("traceback"))
    assert not row["fallbacks"], row["fallbacks"]  # every op of every listed architecture converts


@pytest.mark.bench
def test_cli_quick_suite_writes_its_outputs(tmp_path):
    j, md, png = tmp_path / "s.json", tmp_path / "s.md", tmp_path / "s.png"
    r = subprocess.run([sys.executable, "-m", "kiln.cli", "bench", "suite", "--quick", "--only", "bert,resnet",
                        "--json", str(j), "--markdown", str(md), "--plot", str(png)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(j.read_text())
    assert [row["model"] for row in res["rows"]] == ["bert", "resnet"]
    assert all(row["status"] == "pass" for row in res["rows"])
    assert "all fp32: pass 2/2" in md.read_text() and png.stat().st_size > 0


@pytest.mark.bench
def test_isolated_run_times_every_engine_and_records_memory():
    res = suite.run(["resnet"], threads=(1,), quick=True, isolate=True, inductor=True, repeats=2)
    row = res["rows"][0]
    assert row["status"] == "pass", row
    assert row["rss_mb"]["kiln_compile_peak"] >= row["rss_mb"]["eager_peak"] > 0
    assert {"kiln_cold", "inductor"} <= set(row["compile_s"])


@pytest.mark.slow  # a fresh process and a bf16 decoder compile: make test-slow (CI runs it)
def test_eager_bf16_error_covers_the_decoder_cache_as_kilns_does():
    # a fresh process: no earlier compile has registered transformers' cache pytrees, so this
    # checks that the suite registers them before eager runs (the bf16 bound then comes from
    # the logits and every cache tensor, the same outputs Kiln's error is taken over)
    code = ("import json; from kiln.bench import suite; "
            "r = suite.run_model('qwen2', 'bf16', quick=True, inductor=False, timing=False); "
            "print(json.dumps({k: r.get(k) for k in ('status', 'output_tensors', 'eager_bf16_rel', 'error')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = suite_models.config_of(suite_models.BY_NAME["qwen2"], quick=True)[1]
    assert row["output_tensors"] == 1 + 2 * cfg.num_hidden_layers, row  # logits, then keys and values per layer
    assert row["status"] == "pass", row
