"""The on-disk cache of generated kernels: exported TVM modules keyed by what determines
their machine code, under ``<KILN_CACHE_DIR>/compile/tvm``.

A module is exported under a temporary name and renamed into place (readers see a whole
file or none); one that does not load is rebuilt, never trusted. The directory is kept
under ``KILN_TVM_CACHE_MAX_MB`` by evicting the least recently used modules.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile

from kiln.options import cache_subdir, configure_tvm_environment, settings

from .cache import evict_lru


def module_dir() -> str:
    """``<cache root>/compile/tvm``: beside the compile cache's entries."""
    return cache_subdir(os.path.join("compile", "tvm"))


def evict_modules(max_bytes: int | None = None) -> None:
    """Keep the exported modules under ``KILN_TVM_CACHE_MAX_MB``, least recently used out first."""
    evict_lru(module_dir(), settings().tvm_cache_max_bytes if max_bytes is None else max_bytes, lambda name: True)


@functools.lru_cache(maxsize=1)
def _tvm_version() -> str:  # (the package metadata is read once: every module key names it)
    try:
        return importlib.metadata.version("apache-tvm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def module_key(signature: str, config: dict, target, threads: int) -> str:
    """What determines the machine code: the group, the schedule config, the target (CPU
    name and ISA features), the thread count (parallel loops or none) and the versions."""
    from kiln import __version__
    from kiln.codegen.tvm import CODEGEN_VERSION

    parts = [__version__, str(CODEGEN_VERSION), _tvm_version(), signature, json.dumps(config, sort_keys=True),
             target.key(), str(threads)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def load_cached(key: str):
    """The cached module's function for ``key``, or None (absent or unloadable: rebuilt)."""
    from kiln.codegen.tvm_runtime import load_module

    path = os.path.join(module_dir(), f"{key}.so")
    if not os.path.exists(path):
        return None
    try:
        fn = load_module(path)
    except Exception:  # noqa: BLE001  (a truncated or foreign file: rebuild it, never trust it)
        return None
    try:
        os.utime(path)  # recently used: last to be evicted
    except OSError:
        pass
    return fn


def build_and_store(group, config: dict, target, threads: int, key: str):
    """Generate code for ``group`` with ``config``, export it under ``key`` (atomically), load it."""
    from kiln.codegen import tvm as tvm_codegen

    configure_tvm_environment()
    ex = tvm_codegen.build(group, config, target, threads)
    d = module_dir()
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".so")
    os.close(fd)
    try:
        ex.export_library(tmp)
        os.replace(tmp, os.path.join(d, f"{key}.so"))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    evict_modules()
    fn = load_cached(key)
    if fn is None:
        raise RuntimeError(f"exported module {key}.so does not load")
    return fn


def compiled(group, config: dict, target, threads: int) -> tuple[object, bool]:
    """(function, built now?) for ``group`` under ``config``: from the cache when present."""
    from kiln.codegen.tvm import signature

    key = module_key(signature(group), config, target, threads)
    fn = load_cached(key)
    if fn is not None:
        return fn, False
    return build_and_store(group, config, target, threads, key), True


def module_file(group, config: dict, target, threads: int) -> str:
    """The exported module's path for ``group`` under ``config`` (what ``kiln.save`` ships),
    exported again when it has left the cache since it was loaded."""
    from kiln.codegen.tvm import signature

    key = module_key(signature(group), config, target, threads)
    path = os.path.join(module_dir(), f"{key}.so")
    if not os.path.exists(path):
        build_and_store(group, config, target, threads, key)
    return path


def build_in_memory(group, config: dict, target, threads: int):
    """A candidate for tuning: compiled, not exported (only the winner is kept)."""
    from kiln.codegen import tvm as tvm_codegen

    configure_tvm_environment()
    return tvm_codegen.build(group, config, target, threads)["main"]
