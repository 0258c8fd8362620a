"""Compilation targets: a small, immutable description of the machine code is built for.

``Target.parse`` accepts what users write (``"cpu"``, ``"cuda"``, ``"cuda:sm_80"``,
``"reference"``) or a ``Target``. ``kind`` keys the kernel registry; ``key()`` is the
string every cache and tuning-database key includes, so results measured on one machine
are never reused on another with different ISA features or GPU architecture.
"""
from __future__ import annotations

import functools
import os
import platform
import re
from dataclasses import dataclass, field

from .errors import KilnError

KINDS = ("cpu", "cuda", "reference")

# CPU features Kiln's kernels and code generators care about (Linux /proc/cpuinfo names)
CPU_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


@dataclass(frozen=True)
class Target:
    """A device to compile for: kind, architecture, CPU features, cores."""
    kind: str  # "cpu" | "cuda" | "reference"
    arch: str = ""  # CPU: LLVM -mcpu name ("sapphirerapids"); CUDA: "sm_90"
    features: frozenset[str] = field(default_factory=frozenset)
    cores: int = 1
    device_name: str = ""  # the GPU's name when one is present; empty when built ahead

    @property
    def sm(self) -> int | None:
        """The CUDA compute capability as an int (80, 90), None off CUDA."""
        m = re.fullmatch(r"sm_(\d+)a?", self.arch) if self.kind == "cuda" else None
        return int(m.group(1)) if m else None

    def has(self, feature: str) -> bool:
        return feature in self.features

    def key(self) -> str:
        return f"{self.kind}:{self.arch}:{','.join(sorted(self.features))}:{self.device_name}"

    def __str__(self) -> str:
        return self.kind if not self.arch else f"{self.kind}:{self.arch}"

    @staticmethod
    def parse(spec: "str | Target | None") -> "Target":
        if isinstance(spec, Target):
            return spec
        if spec is None or spec == "cpu":
            return host_cpu()
        if spec == "reference":
            return Target("reference")
        if isinstance(spec, str) and (spec == "cuda" or spec.startswith("cuda:")):
            arch = spec.split(":", 1)[1] if ":" in spec else ""
            return cuda(arch or None)
        raise KilnError(f"unknown target {spec!r}; Kiln supports cpu, cuda, cuda:sm_80, cuda:sm_90, reference")


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _llvm_cpu(flags: set[str]) -> str:
    # the oldest LLVM CPU name whose ISA the host has; LLVM's own host detection would do,
    # but then the cache key would depend on the LLVM build rather than the machine
    if {"amx_tile", "amx_bf16", "avx512_fp16"} <= flags:
        return "sapphirerapids"
    if {"avx512f", "avx512_vnni", "avx512_bf16"} <= flags:
        return "cooperlake"
    if {"avx512f", "avx512_vnni"} <= flags:
        return "cascadelake"
    if "avx512f" in flags:
        return "skylake-avx512"
    if "avx2" in flags:
        return "haswell"
    return "x86-64" if platform.machine() in ("x86_64", "AMD64") else "generic"


@functools.lru_cache(maxsize=None)
def host_cpu() -> Target:
    flags = _cpuinfo_flags()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return Target("cpu", _llvm_cpu(flags), frozenset(f for f in CPU_FEATURES if f in flags), cores)


def cuda(arch: str | None = None) -> Target:
    """The CUDA target: the present GPU's architecture, or ``arch`` ("sm_80", "sm_90") to
    build ahead of time on a machine without one."""
    name = ""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            name = torch.cuda.get_device_name()
            arch = arch or f"sm_{major}{minor}"
    except Exception:  # a CPU-only torch build: no device, build ahead
        pass
    arch = arch or "sm_90"
    if not re.fullmatch(r"sm_\d{2,3}a?", arch):
        raise KilnError(f"CUDA architecture must look like sm_80 or sm_90, got {arch!r}")
    return Target("cuda", arch, frozenset(), 1, name)
