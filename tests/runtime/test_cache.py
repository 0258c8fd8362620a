"""The compile cache: hits across processes, and corrupt, truncated, foreign or racing
entries never trusted."""
import json
import os
import subprocess
import sys

import pytest
import torch

import kiln
from kiln.runtime import cache

HERE = os.path.dirname(__file__)
SCRIPT = """
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {here!r})
import torch, kiln, tiny_models
m, x = tiny_models.mlp()
c = kiln.compile(m, x)
ok = bool((c(*x) - m(*x)).abs().max() < 1e-5)
print(json.dumps({{"hit": c.report.compile_cache_hit, "ok": ok}}))
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    return tmp_path


def _compile_in_new_process(env_dir):
    env = {**os.environ, "KILN_CACHE_DIR": str(env_dir)}
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(here=HERE)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def _entries(d, kind="kernels"):
    """Cache entries of one kind: "kernels" (a compile's kernel choices) or "import" (a torch
    model's imported graph, python/kiln/import_cache.py)."""
    out = []
    for f in os.listdir(os.path.join(d, "compile")):
        if f.endswith(".kiln") and not f.startswith("."):
            with open(os.path.join(d, "compile", f), "rb") as fh:
                fh.readline()
                is_import = b'"graph"' in fh.read(64)
            if is_import == (kind == "import"):
                out.append(f)
    return out


def test_second_compile_in_a_new_process_hits(cache_dir):
    assert _compile_in_new_process(cache_dir) == {"hit": False, "ok": True}
    assert _compile_in_new_process(cache_dir) == {"hit": True, "ok": True}
    assert len(_entries(cache_dir)) == 1 and len(_entries(cache_dir, "import")) == 1


def _one_entry(cache_dir):
    sys.path.insert(0, HERE)
    import tiny_models

    m, x = tiny_models.mlp()
    c = kiln.compile(m, x)
    assert not c.report.compile_cache_hit
    (name,) = _entries(cache_dir)
    return m, x, os.path.join(cache_dir, "compile", name)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad_checksum", "other_version", "foreign_key"])
def test_damaged_entries_are_ignored_and_rebuilt(cache_dir, damage):
    m, x, path = _one_entry(cache_dir)
    data = open(path, "rb").read()
    header, payload = data.split(b"\n", 1)
    h = json.loads(header)
    if damage == "garbage":
        data = os.urandom(len(data))
    elif damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "bad_checksum":
        assert b'"kernels"' in payload
        data = header + b"\n" + payload.replace(b'"kernels"', b'"kernelz"', 1)  # valid JSON, another checksum
    elif damage == "other_version":
        h["version"] = 999
        data = json.dumps(h).encode() + b"\n" + payload
    elif damage == "foreign_key":
        h["key"] = "0" * 64  # an entry written for another compile, copied under this name
        data = json.dumps(h).encode() + b"\n" + payload
    open(path, "wb").write(data)
    c = kiln.compile(m, x)
    assert not c.report.compile_cache_hit  # not trusted
    torch.testing.assert_close(c(*x), m(*x))
    assert cache.load(os.path.basename(path)[:-5]) is not None  # rebuilt into a valid entry
    assert kiln.compile(m, x).report.compile_cache_hit


def test_entry_for_a_different_optimized_graph_is_not_used(cache_dir):
    m, x, path = _one_entry(cache_dir)
    key = os.path.basename(path)[:-5]
    data = cache.load(key)
    cache.store(key, {**data, "kernels": data["kernels"][:-1]})  # recorded for another graph
    c = kiln.compile(m, x)
    assert not c.report.compile_cache_hit
    torch.testing.assert_close(c(*x), m(*x))


def test_two_processes_compiling_at_once(cache_dir):
    env = {**os.environ, "KILN_CACHE_DIR": str(cache_dir)}
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT.format(here=HERE)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["ok"]
    (name,) = _entries(cache_dir)  # one valid entry, no temporary files left
    assert cache.load(name[:-5]) is not None
    assert not [f for f in os.listdir(os.path.join(cache_dir, "compile")) if f.startswith(".tmp")]


def test_cache_size_is_bounded(cache_dir, monkeypatch):
    for i in range(20):
        cache.store(f"{i:064d}", {"kernels": ["x" * 20_000]})
        os.utime(os.path.join(cache.cache_dir(), f"{i:064d}.kiln"), (1000 + i, 1000 + i))
    monkeypatch.setenv("KILN_CACHE_MAX_MB", str(100_000 / 1024 / 1024))
    cache.evict()
    left = sorted(_entries(cache_dir))
    assert 0 < len(left) <= 5
    assert left[-1] == f"{19:064d}.kiln"  # the most recently used survive


def test_cache_can_be_disabled(cache_dir, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", "0")
    sys.path.insert(0, HERE)
    import tiny_models

    m, x = tiny_models.mlp()
    kiln.compile(m, x)
    assert not os.path.exists(os.path.join(cache_dir, "compile")) or not _entries(cache_dir)


def test_remeasure_replaces_the_recorded_choices(cache_dir, monkeypatch):
    """remeasure=True (kiln tune) measures afresh instead of reusing the entry, and its
    choices replace the entry's; which kernels win is not this test's business."""
    m, x, path = _one_entry(cache_dir)
    key = os.path.basename(path)[:-5]
    data = cache.load(key)
    cache.store(key, {**data, "written_by": "earlier"})
    c = kiln.compile(m, x, remeasure=True)
    assert not c.report.compile_cache_hit
    torch.testing.assert_close(c(*x), m(*x))
    assert "written_by" not in cache.load(key)  # replaced by the new measurement
    assert kiln.compile(m, x).report.compile_cache_hit


def test_kiln_tune_command(cache_dir, capsys):
    from kiln import cli

    sys.path.insert(0, HERE)
    assert cli.main(["tune", "tiny_models:mlp", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tiny_models:mlp: ") and "nodes re-measured" in out
