import math
import sqlite3
import subprocess
import sys

import pytest

from kiln.codegen.autotune import Budget, Space, TuningDB, TuningKey, space, tune
from kiln.errors import KilnError


def test_space_iterates_valid_configs_default_first():
    s = Space.of(lambda c: c["a"] <= c["b"], a=[1, 2, 4], b=[2, 4])
    cfgs = list(s)
    assert cfgs[0] == s.default() == {"a": 1, "b": 2}
    assert {"a": 4, "b": 2} not in cfgs and len(cfgs) == len(s) == 5
    samp = s.sample(3, seed=1)
    assert samp[0] == s.default() and len({tuple(c.items()) for c in samp}) == 3


def test_space_decorator_attaches_to_kernel():
    @space(block=[16, 32])
    def k():
        pass

    assert [c["block"] for c in k.tune_space] == [16, 32]


def test_tune_picks_fastest_failures_lose_and_db_round_trips(tmp_path):
    db = TuningDB(str(tmp_path / "t.sqlite"))
    key = TuningKey("test.kernel", "f32[8,8]", "cpu:x")
    cost = {1: 3.0, 2: 1.0, 4: float("nan")}
    calls = []

    def measure(cfg):
        calls.append(cfg["b"])
        if cfg["b"] == 8:
            raise RuntimeError("does not compile")
        return cost[cfg["b"]]

    s = Space.of(b=[1, 2, 4, 8])
    r = tune(key, s, measure, "max", db)
    assert r.config == {"b": 2} and r.seconds == 1.0 and r.trials == 4 and not r.from_db
    r2 = tune(key, s, lambda c: pytest.fail("a hit must not measure"), "max", db)
    assert r2.from_db and r2.config == {"b": 2}
    db.close()
    # a new process reads what this one stored
    code = ("from kiln.codegen.autotune import TuningDB, TuningKey;"
            f"print(TuningDB({str(tmp_path / 't.sqlite')!r}).get(TuningKey('test.kernel','f32[8,8]','cpu:x')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'b': 2" in out


def test_a_stored_config_outside_the_current_space_is_tuned_again(tmp_path):
    # a schedule template whose knobs changed: what was stored for the old space is not reused
    db = TuningDB(str(tmp_path / "t.sqlite"))
    key = TuningKey("test.kernel", "f32[8,8]", "cpu:x")
    db.put(key, {"b": 32768}, 1e-6)
    s = Space.of(b=[1, 2])
    assert {"b": 2} in s and {"b": 32768} not in s and {"b": 2, "c": 1} not in s
    r = tune(key, s, lambda c: float(c["b"]), "max", db)
    assert r.config == {"b": 1} and not r.from_db
    assert tune(key, s, lambda c: pytest.fail("now a hit"), "max", db).from_db


def test_budget_none_uses_default_and_all_failing_is_an_error(tmp_path):
    db = TuningDB(str(tmp_path / "t.sqlite"))
    s = Space.of(b=[3, 5])
    r = tune(TuningKey("k", "s", "t"), s, lambda c: 1.0, "none", db)
    assert r.config == {"b": 3} and r.trials == 0 and math.isinf(r.seconds)
    with pytest.raises(KilnError, match="every one of 2"):
        tune(TuningKey("k2", "s", "t"), s, lambda c: 1 / 0, "max", db)
    with pytest.raises(KilnError, match="tune must be"):
        Budget.parse("fastest")


def test_corrupt_database_is_moved_aside_and_rebuilt(tmp_path):
    p = tmp_path / "t.sqlite"
    p.write_bytes(b"this is not a database" * 100)
    db = TuningDB(str(p))
    assert len(db) == 0
    db.put(TuningKey("k", "s", "t"), {"x": 1}, 0.5)
    assert db.get(TuningKey("k", "s", "t")) == ({"x": 1}, 0.5)
    assert any(q.name.startswith("t.sqlite.corrupt-") for q in tmp_path.iterdir())
    sqlite3.connect(str(p)).close()
