"""The compile cache: a compile's decisions, keyed by what determines them.

Key: the imported graph's structural hash (ops, attributes, shapes, dtypes; not weight
values), the compile options, the target with its CPU features, the versions of Kiln and
torch, and a fingerprint of Kiln's code (``code_fingerprint``). An entry is one file ``<key>.kiln``: a header line (format, version, key,
SHA-256 of the payload) and the payload (kernel choices, and the hash of the optimized
graph they were made for). Writes go to a temporary
file then ``os.replace`` — readers see a whole entry or none, and two processes writing the
same entry both succeed, leaving one valid file. An entry that is truncated, corrupt,
from another version or for another key is ignored (and overwritten by the rebuild), never
trusted. The directory (``KILN_CACHE_DIR``, default ``~/.cache/kiln``) is kept under a size
bound (``KILN_CACHE_MAX_MB``, default 2048) by evicting the least recently used entries.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time

from kiln.options import cache_subdir, settings

FORMAT = "kiln-compile-cache"
VERSION = 1


def cache_dir() -> str:
    return cache_subdir("compile")


def enabled() -> bool:
    return settings().cache


_CODE_PACKAGES = ("kiln", "kiln.ir", "kiln.frontends", "kiln.passes", "kiln.kernels", "kiln.codegen", "kiln.runtime")
_fingerprint: str | None = None


def code_fingerprint() -> str:
    """SHA-256 over Kiln's own code: every Python source of the compiler's packages and the
    native module. Cached decisions (kernel choices, imported graphs) are made by the code;
    one made by other code — a development checkout between commits, an upgrade that kept
    the version number — is never reused. Computed once per process."""
    global _fingerprint
    if _fingerprint is None:
        import importlib.util

        files = []
        for name in _CODE_PACKAGES:  # located, not imported (kiln.codegen would import TVM)
            for d in importlib.util.find_spec(name).submodule_search_locations:
                files += [os.path.join(d, f) for f in os.listdir(d) if f.endswith(".py")]
        try:
            from kiln import _C

            files.append(_C.__file__)
        except ImportError:
            pass
        h = hashlib.sha256()
        for f in sorted(set(files)):
            h.update(os.path.basename(f).encode())
            with open(f, "rb") as fh:
                h.update(hashlib.sha256(fh.read()).digest())
        _fingerprint = h.hexdigest()
    return _fingerprint


def make_key(graph_hash: str, target, options: dict) -> str:
    """``target`` is a ``kiln.target.Target``: its key carries the CPU's ISA features or the GPU's SM."""
    import torch

    from kiln import __version__

    from kiln.kernels.registry import all_kernels

    # the kernels a choice could pick from: a new or removed kernel invalidates old choices
    kernels = ",".join(sorted(k.name for k in all_kernels() if k.target in (target.kind, "reference")))
    parts = [FORMAT, str(VERSION), __version__, code_fingerprint(), torch.__version__, graph_hash, target.key(),
             platform.machine(), json.dumps(options, sort_keys=True, default=str), kernels]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _path(key: str) -> str:
    return os.path.join(cache_dir(), f"{key}.kiln")


def load(key: str) -> dict | None:
    """The payload stored under ``key``, or None if absent or not trustworthy."""
    path = _path(key)
    try:
        with open(path, "rb") as f:
            header = json.loads(f.readline())
            payload = f.read()
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        return None
    if header.get("key") != key or header.get("sha256") != hashlib.sha256(payload).hexdigest():
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    try:
        os.utime(path)  # recently used: last to be evicted
    except OSError:
        pass
    return data


def store(key: str, data: dict) -> None:
    payload = json.dumps(data).encode()
    header = json.dumps({"format": FORMAT, "version": VERSION, "key": key,
                         "sha256": hashlib.sha256(payload).hexdigest(), "written": time.time()}).encode()
    d = cache_dir()
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".kiln")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header + b"\n" + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, _path(key))
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return  # a cache that cannot be written is only slower, never wrong
    evict()


def evict(max_bytes: int | None = None) -> None:
    if max_bytes is None:
        max_bytes = settings().cache_max_bytes
    evict_lru(cache_dir(), max_bytes, lambda name: name.endswith(".kiln"))


def evict_lru(d: str, max_bytes: int, is_entry) -> None:
    """Delete the least recently used entries of directory ``d`` (files whose name
    ``is_entry`` accepts) until they total at most ``max_bytes``; temporary files a crashed
    writer left behind (``.tmp-*``, over an hour old) go too."""
    entries = []
    for name in os.listdir(d):
        p = os.path.join(d, name)
        try:
            st = os.stat(p)
        except OSError:
            continue
        if name.startswith(".tmp-") and time.time() - st.st_mtime > 3600:
            _unlink(p)
            continue
        if is_entry(name) and not name.startswith("."):
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(e[1] for e in entries)
    for _, size, p in sorted(entries):
        if total <= max_bytes:
            break
        _unlink(p)
        total -= size


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
