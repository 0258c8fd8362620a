"""kiln bench: the quick kernel and model benchmarks run end to end and write well-formed
JSON. No timing assertions: benchmarks measure, tests only check that they ran. The runs are
marked ``bench`` (minutes each): ``make bench-smoke`` runs them, ``make test`` does not."""
import json
import os
import shutil
import subprocess
import sys

import pytest

ENV = {**os.environ, "KILN_PROGRESS": "0"}


def _kiln(*args, timeout=900):  # the timeout only catches a hang; run time is not asserted
    p = subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=timeout,
                       env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def test_console_script_help():
    exe = shutil.which("kiln") or os.path.join(os.path.dirname(sys.executable), "kiln")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60).stdout
    for cmd in ("demo", "dump", "bench", "explain"):
        assert cmd in out


@pytest.mark.bench
def test_bench_kernels_quick(tmp_path):
    j, c, png = tmp_path / "k.json", tmp_path / "k.csv", tmp_path / "roof.png"
    out = _kiln("bench", "kernels", "--quick", "--json", str(j), "--csv", str(c), "--plot", str(png))
    res = json.loads(j.read_text())
    assert res["machine"]["peak_gflops"] > 0 and res["machine"]["bandwidth_gbs"] > 0
    rows = [r for r in res["rows"] if "error" not in r]
    assert {"conv2d", "linear", "attention", "lstm"} <= {r["op"] for r in rows}
    lstm = {r["kernel"] for r in rows if r["op"] == "lstm"}
    assert "reference.lstm" in lstm and len(lstm) >= 2  # Kiln's kernels next to the reference
    assert all(r["median_us"] > 0 and r["p25_us"] <= r["p75_us"] for r in rows)
    assert c.read_text().startswith("model,op,shape,kernel")
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "roofline" in out


@pytest.mark.bench
def test_bench_kernels_bf16_attention(tmp_path):
    j = tmp_path / "k.json"
    out = _kiln("bench", "kernels", "--quick", "--precision", "bf16", "--op", "attention", "--json", str(j))
    res = json.loads(j.read_text())
    assert res["precision"] == "bf16" and "bf16" in out
    rows = [r for r in res["rows"] if "error" not in r]
    assert rows and {r["op"] for r in rows} == {"attention"}
    assert "reference.attention" in {r["kernel"] for r in rows}


@pytest.mark.bench
@pytest.mark.parametrize("threads", ["1,2"])
def test_bench_models_quick(tmp_path, threads):
    j, md = tmp_path / "m.json", tmp_path / "m.md"
    out = _kiln("bench", "models", "--quick", "--threads", threads, "--json", str(j), "--markdown", str(md))
    res = json.loads(j.read_text())
    assert [r["model"] for r in res["results"]] == ["resnet18", "bert", "lstm"]
    for r in res["results"]:
        for th in ("1", "2"):
            row = r["threads"][th]
            assert {"eager", "kiln"} <= set(row["median_ms"])
            assert row["max_abs_err"]["kiln"] < 1e-3
            assert {"kiln_bf16", "kiln_int8", "openvino", "openvino_bf16", "openvino_int8", "inductor_bf16"} \
                <= set(row["median_ms"]), r["errors"]
            if all((row.get("amx_ceiling_gflops") or {}).get(p) for p in ("bf16", "int8")):  # a CPU with AMX
                assert set(row["fraction_of_amx"]) >= {"kiln_bf16", "kiln_int8", "openvino_int8"}
            assert row["sqnr_db"]["kiln_bf16"] > 20 and row["sqnr_db"]["openvino"] > 40
        assert "kiln" in r["compile_s"]
    assert md.read_text().startswith("Median latency") and "| resnet18 | 1 |" in out


@pytest.mark.bench
def test_bench_elementwise_ops_and_size_sweep(tmp_path):
    j = tmp_path / "e.json"
    out = _kiln("bench", "elementwise", "--op", "gelu", "--n", "4096", "65536", "--repeats", "1", "--threads", "1",
                "--tune", "none", "--json", str(j))
    res = json.loads(j.read_text())
    assert [r["n"] for r in res] == [4096, 65536]  # one result per size, in order
    for r in res:
        assert r["op"] == "gelu" and r["bytes_per_element"] == 8
        assert set(r["engines"]) == {"kiln kernel", "kiln step", "torch eager"}
        assert all(e["median_ms"] > 0 and e["fraction_of_bandwidth"] > 0 for e in r["engines"].values())
    assert "gelu(x) over 65,536 fp32" in out


@pytest.mark.bench
def test_pass_ab_compiles_with_and_without_the_pass():
    p = subprocess.run([sys.executable, "-m", "kiln.bench.pass_ab", "demanded_rows", "--models", "lstm", "--threads", "1",
                        "--repeats", "2"], capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    row = [line for line in p.stdout.splitlines() if line.startswith("| lstm |")]
    assert len(row) == 1 and row[0].split("|")[6].strip().endswith("x")  # a measured speedup column
    bad = subprocess.run([sys.executable, "-m", "kiln.bench.pass_ab", "no_such_pass", "--models", "lstm",
                          "--threads", "1", "--repeats", "1"], capture_output=True, text=True, timeout=600, env=ENV)
    assert bad.returncode != 0 and "unknown pass or phase" in bad.stderr


@pytest.mark.bench
def test_pass_ab_takes_a_model_factory_and_a_kernel(tmp_path):
    # a model as package.module:factory (as `kiln explain` takes it), with and without a kernel
    (tmp_path / "pab_factory.py").write_text(
        "import torch\n"
        "def small():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU()).eval(), (torch.randn(4, 16),)\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "kiln.bench.pass_ab", "--kernel", "cpu.onednn_linear", "--models",
                        "pab_factory:small", "--threads", "1", "--repeats", "2"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    row = [line for line in p.stdout.splitlines() if line.startswith("| pab_factory:small |")]
    assert len(row) == 1 and row[0].split("|")[6].strip().endswith("x")


def test_compute_peak_gflops_checks_its_arguments():
    from kiln import _C

    assert _C.compute_peak_gflops("fma", 1, 10_000) > 0  # AVX-512 or AVX2 registers
    with pytest.raises(ValueError):
        _C.compute_peak_gflops("fp64", 1, 10)
    with pytest.raises(ValueError):
        _C.compute_peak_gflops("fma", 0, 10)
    with pytest.raises(ValueError):
        _C.compute_peak_gflops("amx_int8", 1, 10, 7)  # six accumulators and two sources fill the tiles
    assert _C.compute_peak_gflops("clock", 1, 10_000) > 0  # GHz


def test_amx_peak_counts_every_accumulator():
    """The AMX loops return positive rates for every accumulator count (where the CPU has AMX);
    what the rates are is the benchmark's business, not a test's."""
    from kiln import _C
    from kiln.bench import machine

    if not _C.amx_bf16_supported():
        pytest.skip("no AMX on this CPU")
    for kind in ("bf16", "int8"):
        for acc in (1, 6):
            assert machine.amx_rate(kind, 1, acc, iters=1000) > 0
        assert machine.amx_rate(f"{kind}_loaded", 1, iters=1000) > 0
    assert set(machine.amx_ceilings(1, rounds=1)) == {"bf16", "int8"}


@pytest.mark.bench
def test_machine_ceilings(capsys):
    from kiln.bench import machine

    machine.main(["--rounds", "1", "--threads", "1", "--sweep"])
    out = capsys.readouterr().out
    assert ("| threads | FMA fp32 GFLOP/s | dot bf16 GFLOP/s | dot int8 GOP/s | AMX bf16 GFLOP/s | AMX int8 GOP/s |"
            in out and "\n| 1 | " in out)
    assert "| accumulators | 1 | 2 | 4 | 6 | 2x2 block, tiles loaded |" in out


@pytest.mark.bench
def test_bench_quant_against_openvino_int8(tmp_path):
    j = tmp_path / "q.json"
    p = subprocess.run([sys.executable, "-m", "kiln.bench.quant", "--quick", "--threads", "1", "--only", "resnet,lstm",
                        "--repeats", "2", "--json", str(j)], capture_output=True, text=True, timeout=900, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads(j.read_text())
    row = res["resnet18"]["threads"]["1"]
    assert set(row["median_ms"]) == {"kiln_fp32", "kiln_int8", "openvino_int8"}
    agree = row["top1_agreement_pct_over_10"]
    assert agree["kiln_fp32"] == 100.0 and 0 <= agree["openvino_int8"] <= 100
    assert row["sqnr_db_vs_eager_fp32"]["kiln_fp32"] > 60 and row["kiln_int8_vs_openvino_int8"] > 0
    assert "openvino_int8" in res["lstm"]["threads"]["1"]["sqnr_db_vs_eager_fp32"]


@pytest.mark.bench
def test_bench_stability_compiles_in_fresh_processes(tmp_path):
    j = tmp_path / "s.json"
    p = subprocess.run([sys.executable, "-m", "kiln.bench.stability", "lstm", "--processes", "2", "--repeats", "2",
                        "--json", str(j)], capture_output=True, text=True, timeout=900, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    (row,) = json.loads(j.read_text())
    assert len(row["median_ms"]) == 2 and row["spread"] >= 0 and 1 <= row["kernel_sets"] <= 2
    assert "| lstm | fp32 | 1 |" in p.stdout


@pytest.mark.bench
def test_bench_dynamic_quick(tmp_path):
    j = tmp_path / "dynamic.json"
    out = _kiln("bench", "dynamic", "--quick", "--engines", "eager,kiln_dynamic,kiln_static", "--json", str(j))
    rows = json.loads(j.read_text())
    assert {(r["model"], r["engine"]) for r in rows} == {(m, e) for m in ("hf_bert", "resnet18")
                                                          for e in ("eager", "kiln_dynamic", "kiln_static")}
    assert all("error" not in r for r in rows), rows
    assert all(r["max_abs_err"] < 1e-3 and r["requests"] == 20 for r in rows)
    assert "p99/p50" in out
    # interleaved in one process, bf16: ONNX Runtime has no bf16 CPU path and says so in its row
    out = _kiln("bench", "dynamic", "--quick", "--interleave", "--precision", "bf16", "--models", "hf_bert",
                "--engines", "eager,kiln_dynamic,onnxruntime", "--json", str(j))
    rows = {r["engine"]: r for r in json.loads(j.read_text())}
    assert "no bf16" in rows["onnxruntime"]["error"]
    assert all(rows[e]["precision"] == "bf16" and rows[e]["max_abs_err"] < 5e-2 for e in ("eager", "kiln_dynamic"))
    assert "Kiln dynamic total" in out
    # --no-spin: the command runs again in a new process whose OpenMP workers sleep when idle
    # (ONNX Runtime's pool too), and says so
    out = _kiln("bench", "dynamic", "--quick", "--interleave", "--no-spin", "--models", "hf_bert", "--threads", "2",
                "--engines", "kiln_dynamic,onnxruntime", "--json", str(j))
    rows = json.loads(j.read_text())
    assert [r["engine"] for r in rows] == ["kiln_dynamic", "onnxruntime"]
    assert all("error" not in r and r["threads"] == 2 and r["max_abs_err"] < 1e-3 for r in rows), rows
    assert "idle workers: sleep (OMP_WAIT_POLICY=PASSIVE" in out
    # --ahead --cold: Kiln's artifact compiled on empty caches before the stream, loaded in
    # the stream's build; the peers start from an ONNX file
    out = _kiln("bench", "dynamic", "--quick", "--ahead", "--cold", "--models", "resnet18",
                "--engines", "kiln_dynamic,onnxruntime", "--json", str(j))
    rows = json.loads(j.read_text())
    assert all("error" not in r and r["max_abs_err"] < 1e-3 for r in rows), rows
    assert "empty at the start (--cold)" in out and "the build column is kiln.load" in out
    # the LSTM forecaster's stream: batch and time vary, one dynamic plan
    _kiln("bench", "dynamic", "--quick", "--interleave", "--models", "lstm",
          "--engines", "eager,kiln_dynamic,onnxruntime", "--json", str(j))
    rows = {r["engine"]: r for r in json.loads(j.read_text())}
    assert all("error" not in r and r["model"] == "lstm" and r["max_abs_err"] < 1e-4 for r in rows.values()), rows


@pytest.mark.bench
def test_bench_dynamic_per_length_quick():
    """--per-length: the dynamic plan against the static plan at each size, for the LSTM (its
    batch and time dims named, the lengths at batch 1) as for BERT."""
    from kiln.bench import dynamic

    rows = dynamic.per_length("lstm", [8, 16], 1, True, None, 3)
    assert [r["size"] for r in rows] == [8, 16]
    assert all(r["max_abs_err"] < 1e-4 and r["dynamic_ms"] > 0 and r["static_ms"] > 0 for r in rows), rows


@pytest.mark.bench
def test_bench_artifacts_quick(tmp_path):
    """python -m kiln.bench.artifacts end to end on a small model: it loads the artifact in
    new processes and checks the outputs are bitwise those of the saved model."""
    from kiln.bench import artifacts

    out = tmp_path / "a.json"
    assert artifacts.main(["lstm", "--quick", "--runs", "1", "--peer", "onnxruntime,openvino", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["bitwise"] and row["artifact_bytes"] > 0 and set(row["split"]) >= {"read_weights", "prepare", "total"}
    for peer in ("onnxruntime", "openvino"):  # both peers ran in their own new processes
        assert "error" not in row[peer], row[peer]
        assert row[peer]["load"] > 0 and row[peer]["first_call"] > 0
    assert "error" not in row["openvino"]["cached"], row["openvino"]["cached"]
    md = artifacts.markdown([row])
    assert "OpenVINO compile_model" in md and "ONNX Runtime session" in md


@pytest.mark.bench
def test_bench_suite_dynamo_quick(tmp_path):
    """torch.compile(backend="kiln") over suite models (tiny configs): each passes against
    eager, and the graphs, graph breaks and fallbacks are reported."""
    j = tmp_path / "dynamo.json"
    out = _kiln("bench", "suite-dynamo", "--quick", "--only", "bert,qwen2,resnet", "--json", str(j))
    rows = {r["model"]: r for r in json.loads(j.read_text())}
    assert set(rows) == {"bert", "qwen2", "resnet"}
    for r in rows.values():
        assert r["status"] == "pass" and r["graphs"] >= 1 and r["rel_err"] <= 1e-4, r
        assert isinstance(r["break_reasons"], dict) and isinstance(r["fallbacks"], dict)
    assert rows["qwen2"]["fallbacks"] == {}  # grouped-query SDPA converts (enable_gqa)
    assert 'torch.compile(backend="kiln"): pass 3/3' in out


@pytest.mark.bench
def test_bench_compile_time_reuses_the_tuning_database(capsys):
    """python -m kiln.bench.compile_time: cold, warm and tuning-database-only compiles, each
    in a new process, all of them succeed (nothing about their speed is asserted)."""
    from kiln.bench import compile_time

    compile_time.main(["lstm", "--no-inductor", "--dynamic", "--batch", "2"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| lstm |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert "error" not in row, row
    assert cells[3] == "True"  # the warm compile hit the compile cache
    assert all(float(c) > 0 for c in (cells[1], cells[2], cells[4]))


@pytest.mark.bench
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bench_rnn_small(tmp_path, cell):
    from kiln import _C

    if not _C.recurrence_supported():
        pytest.skip("Kiln's recurrent layers need AVX-512 or AVX2 + FMA")
    j = tmp_path / "rnn.json"
    out = _kiln("bench", "rnn", "--cell", cell, "--batches", "1,3", "--seq", "6", "--hidden", "24", "--repeats", "3",
                "--json", str(j))
    res = json.loads(j.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 3]
    assert {f"cpu.{cell}_layer", f"cpu.{cell}_hoisted"} <= set(res["kernels"])
    for r in res["rows"]:
        assert {"torch", "onnxruntime", *res["kernels"]} <= set(r["ms"])
        assert max(r["max_abs_err"].values()) < 1e-4
    assert "vs ORT" in out


@pytest.mark.bench
def test_build_ab_compares_builds_in_their_own_processes():
    from kiln import _C

    if not _C.recurrence_supported():
        pytest.skip("Kiln's recurrent layers need AVX-512 or AVX2 + FMA")
    p = subprocess.run([sys.executable, "-m", "kiln.bench.build_ab", _C.__file__, f"{_C.__file__}@16", "--cell", "gru",
                        "--form", "recurrence", "--batches", "1,3", "--hidden", "24", "--inputs", "7", "--seq", "5",
                        "--rounds", "3"], capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 3 ")]
    assert len(rows) == 2 and all("1.000x" in r for r in rows)  # the first build against itself


@pytest.mark.bench
def test_select_chains_builds_bounded_and_unbounded_and_checks_them(tmp_path):
    pytest.importorskip("tvm")
    j = tmp_path / "chains.json"
    p = subprocess.run([sys.executable, "-m", "kiln.bench.select_chains", "--op", "clamp", "--links", "1,3",
                        "--unbounded", "--json", str(j)], capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(j.read_text())["rows"]
    assert [r["links"] for r in rows] == [1, 3]
    assert all(r[m]["match"] for r in rows for m in ("bounded", "unbounded"))
    short, long = rows
    assert short["bounded"]["stored"] == 0 and long["bounded"]["stored"] >= 1  # 3 clamps: 6 selects deep
    assert long["unbounded"]["stored"] == 0 and long["unbounded"]["depth"] == 6
    assert long["bounded"]["depth"] <= 5


@pytest.mark.bench
def test_imports_times_both_builds_of_the_records(tmp_path):
    j = tmp_path / "imports.json"
    p = subprocess.run([sys.executable, "-m", "kiln.bench.imports", "--runs", "1", "--json", str(j)],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    med = json.loads(j.read_text())["median"]
    assert set(med) == {"record", "dataclass"}
    assert all(med[b][phase] > 0 for b in med for phase in ("kiln", "load", "compile"))
    assert "dataclass/record" in p.stdout


@pytest.mark.bench
def test_group_norm_bench_times_the_three_and_reports_errors(tmp_path):
    j = tmp_path / "gn.json"
    p = subprocess.run([sys.executable, "-m", "kiln.bench.group_norm", "--rounds", "1", "--json", str(j)],
                       capture_output=True, text=True, timeout=600, env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(j.read_text())
    assert len(rows) == 6 and all(r[f"{e}_ms"] > 0 for r in rows for e in ("kiln", "reference", "torch_cl"))
    assert all(r["kiln_err_mean100"] < 1e-4 and r["reference_err_mean100"] < 1e-4 for r in rows)


def test_dot_product_ceilings_where_the_cpu_has_them():
    """AVX512-BF16 / AVX512-VNNI register-only rates: positive where present, None (not an
    error) where not."""
    from kiln import _C
    from kiln.bench import machine

    for unit, present in (("dot_bf16", _C.dot_bf16_supported()), ("dot_int8", _C.int8_path(64, "vnni") == "vnni")):
        rate = machine.register_rate(unit, 1, iters=1000)
        assert (rate is not None and rate > 0) if present else rate is None, unit
