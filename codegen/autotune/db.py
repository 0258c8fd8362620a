"""The persistent tuning database (SQLite, one file).

A record is keyed by (kernel name, signature, target key, Kiln version): the signature is
the caller's canonical string of shapes, dtypes and layout; the target key carries the
CPU's ISA features or the GPU's name and SM. A record holds the best configuration and
its measured time. SQLite gives atomic writes and safe concurrent readers; a database file
that cannot be opened or read is moved aside and rebuilt, never trusted.
Location: ``KILN_TUNING_DB`` (a file path), else ``<KILN_CACHE_DIR or ~/.cache/kiln>/tuning.sqlite``.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time

from kiln.ir.record import record

SCHEMA = """CREATE TABLE IF NOT EXISTS tuning (
    kernel TEXT, signature TEXT, target TEXT, version TEXT,
    config TEXT, seconds REAL, trials INTEGER, created REAL,
    PRIMARY KEY (kernel, signature, target, version))"""


@record(slots=False)
class TuningKey:
    kernel: str
    signature: str  # shapes, dtypes, layout: the caller's canonical string
    target: str  # Target.key()


class TuningDB:
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            conn.execute(SCHEMA)
            conn.execute("SELECT count(*) FROM tuning").fetchone()
            return conn
        except sqlite3.DatabaseError:  # corrupt or foreign file: keep it for inspection, start over
            os.replace(self.path, f"{self.path}.corrupt-{int(time.time())}")
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            conn.execute(SCHEMA)
            return conn

    @staticmethod
    def _version() -> str:
        from kiln import __version__

        return __version__

    def get(self, key: TuningKey) -> tuple[dict, float] | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT config, seconds FROM tuning WHERE kernel=? AND signature=? AND target=? AND version=?",
                (key.kernel, key.signature, key.target, self._version())).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0]), float(row[1])
        except (ValueError, TypeError):
            return None

    def put(self, key: TuningKey, config: dict, seconds: float, trials: int = 0) -> None:
        with self._lock, self._conn:
            self._conn.execute("INSERT OR REPLACE INTO tuning VALUES (?,?,?,?,?,?,?,?)",
                               (key.kernel, key.signature, key.target, self._version(),
                                json.dumps(config, sort_keys=True), seconds, trials, time.time()))

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT count(*) FROM tuning").fetchone()[0]

    def close(self) -> None:
        self._conn.close()


_DEFAULT: dict[str, TuningDB] = {}


def default_path() -> str:
    """``KILN_TUNING_DB``, default ``<KILN_CACHE_DIR>/tuning.sqlite``."""
    from kiln.options import settings

    return settings().tuning_db


def default_db() -> TuningDB:
    """The process's database at ``default_path()`` (reopened when the path changes, as in tests)."""
    p = default_path()
    if p not in _DEFAULT:
        _DEFAULT[p] = TuningDB(p)
    return _DEFAULT[p]
