"""Everything a user can set, defined once: compile options and environment settings.

``CompileOptions`` is what ``kiln.compile`` (its keywords), the CLI and ``torch.compile``'s
``options=`` are parsed into, validated here and nowhere else; every error lists the
allowed values from the tuples below. ``Settings`` maps the ``KILN_*`` environment
variables onto typed fields: no other module reads (or writes) ``os.environ``.

This is a base module (any layer may import it), so it imports nothing of Kiln's above
``kiln.errors`` and ``kiln.target``, and torch only inside the functions that need it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import KilnError
from .target import Target

# ----------------------------------------------------------------------------- allowed values
PRECISIONS = ("fp32", "bf16")
QUANT_SCHEMES = ("int8-dynamic", "int8-static", "int8-weight", "int4-weight")
# quantize= also takes "none" and "bf16" (the same as precision="bf16")
QUANTIZE_VALUES = ("none", *QUANT_SCHEMES, "bf16")
OBSERVERS = ("minmax", "percentile", "entropy")
INT4_GROUP_SIZES = (32, 64, 128)
SPARSE_MODES = ("off", "auto", "csr", "bsr", "bsr(R,C)", "2:4")
TUNE_LEVELS = ("none", "fast", "max")  # or a number of seconds per kernel group
# Sparse weights are compressed only where measurement shows the sparse kernel faster
# (passes/sparsity.py), so "auto" is safe as the default: dense models pay a zero count.
DEFAULT_SPARSE = "auto"
# Generated kernels: the schedule template's default (or the tuning database's earlier
# winner) on CPUs, where a cold compile already pays for a TVM build per group; a few
# configurations timed on the device on CUDA, where that is cheap.
DEFAULT_TUNE = {"cpu": "none", "cuda": "fast", "reference": "none"}


def _choices(values) -> str:
    return ", ".join(str(v) for v in values)


@dataclass(frozen=True)
class QuantOptions:
    """Post-training quantization (passes/quantize*.py).

    ``calibration``: batches of the graph's tensor inputs (tuples), needed by int8-static;
    ``observer``: how int8-static picks activation ranges; ``group_size``: int4 weight groups;
    ``min_sqnr``: a layer whose quantized output falls below this SQNR (dB) stays float;
    ``measure_payoff``: time each layer quantized and float and keep the faster."""

    scheme: str
    calibration: tuple = ()
    observer: str = "minmax"
    group_size: int = 128
    min_sqnr: float | None = None
    measure_payoff: bool = True

    def key(self) -> dict:
        """What a cached compile depends on (the calibration data itself is hashed by the
        quantized graph it produces, not here)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "calibration"}
        d["calibration_batches"] = len(self.calibration)
        return d


@dataclass(frozen=True)
class DynamicDim:
    """One input dimension that varies from call to call: ``input`` (name or position),
    ``axis``, the size's ``name`` (dims of one name are the same size: a batch shared by
    several inputs) and its range, ``min``..``max`` (``max`` None: unbounded)."""

    input: str | int
    axis: int
    name: str
    min: int = 1
    max: int | None = None

    def range_text(self) -> str:
        return f"[{self.min}, {'inf' if self.max is None else self.max}]"


@dataclass(frozen=True)
class CompileOptions:
    """How to compile. Build it with ``CompileOptions.parse(**keywords)``; fields are validated."""

    target: Target | None = None  # None: cpu, or cuda when the inputs are on a GPU
    precision: str = "fp32"
    quantize: QuantOptions | None = None
    sparse: str = DEFAULT_SPARSE
    tune: str | float | None = None  # None: DEFAULT_TUNE for the target
    codegen: bool = True
    threads: int | None = None  # None: torch.get_num_threads() at each call
    exclude_kernels: frozenset = frozenset()
    passes: tuple | None = None  # None: every pass; (): none; names or "-name" to skip
    verify: bool = False  # run the IR verifier after every pass
    max_specializations: int = 8  # plans kept per compiled model (one per input signature), LRU
    # dims that vary per call: True (every input's dim 0 is "batch"; integer and bool [batch, seq]
    # inputs' dim 1 is "seq"; for ONNX, the dims the model leaves unnamed or names by dim_param),
    # or DynamicDims (from the dict form); False: every shape exact. None (not given): exact for
    # PyTorch models; an ONNX model's dim_param dims vary (falling back to exact shapes, with a
    # KilnWarning, when its shape computations cannot stay symbolic)
    dynamic: bool | tuple | None = None
    # a dynamic plan's kernels are measured at this many representative sizes (the example's,
    # a quarter of it, and four times it up to the range's end) and each node runs the kernel
    # chosen nearest to a call's size; 1: one choice per node, at the example's size
    size_buckets: int = 2
    # a dynamic plan whose one symbolic size is a batch its ops compute sample by sample runs a
    # large batch in chunks of at most this many samples (runtime/chunks.py): None decides from
    # the plan's intermediate bytes per sample (at least 16 samples a chunk), 0 never chunks
    batch_chunk: int | None = None
    # measure every kernel choice afresh (more rounds) instead of reusing the compile cache's
    # recorded choices; the result replaces them (``kiln tune MODEL``). Not part of the key.
    remeasure: bool = False

    # -- parsing ------------------------------------------------------------------------
    @staticmethod
    def parse(options: "CompileOptions | None" = None, **keywords) -> "CompileOptions":
        """From ``kiln.compile``'s keywords (or an existing ``CompileOptions`` plus overrides)."""
        base = options if options is not None else CompileOptions(verify=settings().verify)
        if not isinstance(base, CompileOptions):
            raise KilnError(f"options must be a kiln.CompileOptions, got {type(base).__name__}")
        unknown = sorted(set(keywords) - KEYWORDS)
        if unknown:
            raise KilnError(f"unknown kiln.compile option(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(KEYWORDS))}")
        fields: dict[str, Any] = {}
        quant = {k: keywords.pop(k) for k in list(keywords) if k in _QUANT_KEYWORDS}
        scheme = keywords.pop("quantize", None)
        if "target" in keywords:
            t = keywords.pop("target")
            fields["target"] = None if t is None else Target.parse(t)
        if "precision" in keywords:
            fields["precision"] = _one_of("precision", keywords.pop("precision"), PRECISIONS)
        if "sparse" in keywords:
            fields["sparse"] = parse_sparse(keywords.pop("sparse"))
        if "tune" in keywords:
            fields["tune"] = parse_tune(keywords.pop("tune"))
        if "codegen" in keywords:
            fields["codegen"] = _bool("codegen", keywords.pop("codegen"))
        if "verify" in keywords:
            fields["verify"] = _bool("verify", keywords.pop("verify"))
        if "remeasure" in keywords:
            fields["remeasure"] = _bool("remeasure", keywords.pop("remeasure"))
        if "threads" in keywords:
            fields["threads"] = parse_threads(keywords.pop("threads"))
        if "exclude_kernels" in keywords:
            fields["exclude_kernels"] = _names("exclude_kernels", keywords.pop("exclude_kernels"),
                                               "a list of kernel names, e.g. ['cpu.amx_linear']")
        if "passes" in keywords:
            fields["passes"] = parse_passes(keywords.pop("passes"))
        if "dynamic" in keywords:
            fields["dynamic"] = parse_dynamic(keywords.pop("dynamic"))
        if "max_specializations" in keywords:
            n = keywords.pop("max_specializations")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise KilnError(f"max_specializations must be a positive int, got {n!r}")
            fields["max_specializations"] = n
        if "size_buckets" in keywords:
            n = keywords.pop("size_buckets")
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 3:
                raise KilnError(f"size_buckets must be 1, 2 or 3, got {n!r}")
            fields["size_buckets"] = n
        if "batch_chunk" in keywords:
            n = keywords.pop("batch_chunk")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise KilnError(f"batch_chunk must be None (decide), 0 (never) or a number of samples, got {n!r}")
            fields["batch_chunk"] = n
        assert not keywords, keywords
        out = dataclasses.replace(base, **fields)
        if isinstance(scheme, QuantOptions):
            if quant:
                raise KilnError(f"give {', '.join(sorted(quant))} inside the QuantOptions, not beside it")
            out = dataclasses.replace(out, quantize=_check_quant(scheme))
        elif scheme is not None or quant:
            out = _with_quantize(out, "none" if scheme is None else scheme, quant)
        return out

    # -- derived ------------------------------------------------------------------------
    def resolved_target(self) -> Target:
        return self.target if self.target is not None else Target.parse("cpu")

    @property
    def tune_budget(self) -> str | float:
        return self.tune if self.tune is not None else DEFAULT_TUNE[self.resolved_target().kind]

    @property
    def scheme(self) -> str:
        """The quantization scheme, "none" without one."""
        return self.quantize.scheme if self.quantize is not None else "none"

    def replace(self, **changes) -> "CompileOptions":
        return dataclasses.replace(self, **changes)

    def key(self) -> dict:
        """The options' part of a compile-cache key: everything that changes decisions."""
        return {"precision": self.precision, "quantize": None if self.quantize is None else self.quantize.key(),
                "sparse": self.sparse, "tune": self.tune_budget, "codegen": self.codegen,
                "exclude_kernels": sorted(self.exclude_kernels),
                "passes": None if self.passes is None else list(self.passes),
                "dynamic": bool(self.dynamic) if not isinstance(self.dynamic, tuple) else [repr(d) for d in self.dynamic],
                "size_buckets": self.size_buckets}


_QUANT_KEYWORDS = {"calibration", "observer", "group_size", "min_sqnr", "quantize_payoff"}
KEYWORDS = {f.name for f in dataclasses.fields(CompileOptions)} | _QUANT_KEYWORDS


def _one_of(name: str, value, allowed) -> Any:
    if value not in allowed:
        raise KilnError(f"{name} must be one of {_choices(allowed)}, got {value!r}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise KilnError(f"{name} must be True or False, got {value!r}")
    return value


def _names(name: str, value, what: str) -> frozenset:
    if value is None:
        return frozenset()
    if isinstance(value, str) or not all(isinstance(k, str) for k in value):
        raise KilnError(f"{name} must be {what}, got {value!r}")
    return frozenset(value)


def parse_threads(threads) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise KilnError(f"threads must be a positive int, got {threads!r}")
    return threads


def parse_tune(tune) -> str | float | None:
    if tune is None or tune in TUNE_LEVELS:
        return tune
    if isinstance(tune, (int, float)) and not isinstance(tune, bool) and tune >= 0 and not math.isnan(tune):
        return float(tune)
    raise KilnError(f"tune must be one of {_choices(TUNE_LEVELS)} or a number of seconds, got {tune!r}")


_SPARSE_RE = re.compile(r"bsr(?:\((\d+),\s*(\d+)\))?")


def parse_sparse(mode) -> str:
    """The canonical spelling of a sparse mode: off, auto, csr, 2:4, bsr(R,C)."""
    if not isinstance(mode, str):
        raise KilnError(f"sparse must be one of {_choices(SPARSE_MODES)}, got {mode!r}")
    m = mode.strip().lower()
    if m in ("off", "auto", "csr", "2:4"):
        return m
    b = _SPARSE_RE.fullmatch(m)
    if b and (b.group(1) is None or (int(b.group(1)) > 0 and int(b.group(2)) > 0)):
        return f"bsr({int(b.group(1) or 4)},{int(b.group(2) or 4)})"
    raise KilnError(f"sparse must be one of {_choices(SPARSE_MODES)}, got {mode!r}")


def parse_passes(passes) -> tuple | None:
    """None (every pass), () (none) or a tuple of phase/pass names, "-name" to skip one. The
    names themselves are the pipeline's: ``kiln.passes.pipeline.check_selection`` checks them."""
    if passes is None or passes == "all":
        return None
    if passes == "none":
        return ()
    if isinstance(passes, str):
        return (passes,)
    if not all(isinstance(p, str) for p in passes):
        raise KilnError(f"passes must be 'all', 'none' or a list of pass or phase names, got {passes!r}")
    return tuple(passes)


_DYNAMIC_FORM = ("dynamic must be True, False, or a dict {input name or position: {axis: name or "
                 "(name, min, max)}}, e.g. {'input_ids': {0: 'batch', 1: ('seq', 1, 512)}}")


def parse_dynamic(spec) -> bool | tuple | None:
    """``dynamic=``: None (not given), a bool, or the dict form as a tuple of ``DynamicDim``s."""
    if spec is None or isinstance(spec, bool):
        return spec
    if isinstance(spec, tuple) and all(isinstance(d, DynamicDim) for d in spec):
        return spec
    if not isinstance(spec, dict) or not spec:
        raise KilnError(f"{_DYNAMIC_FORM}; got {spec!r}")
    dims, ranges = [], {}
    for inp, axes in spec.items():
        if isinstance(inp, bool) or not isinstance(inp, (str, int)) or not isinstance(axes, dict) or not axes:
            raise KilnError(f"{_DYNAMIC_FORM}; got {inp!r}: {axes!r}")
        for axis, d in axes.items():
            if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
                raise KilnError(f"dynamic: axis {axis!r} of input {inp!r} must be a non-negative int")
            name, lo, hi = (d, 1, None) if isinstance(d, str) else (tuple(d) + (None, None))[:3] \
                if isinstance(d, (tuple, list)) and 1 <= len(d) <= 3 else (None, None, None)
            lo = 1 if lo is None else lo
            if not isinstance(name, str) or not name.isidentifier():
                raise KilnError(f"dynamic: input {inp!r} axis {axis}: a dim's name must be an identifier, got {d!r}")
            if isinstance(lo, bool) or not isinstance(lo, int) or lo < 1 or \
                    (hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi < lo)):
                raise KilnError(f"dynamic: {name}'s range must be 1 <= min <= max (ints), got {d!r}")
            if isinstance(d, str):  # a bare name: the range given with the name elsewhere, or [1, inf)
                dims.append((inp, axis, name))
                continue
            if ranges.setdefault(name, (lo, hi)) != (lo, hi):
                raise KilnError(f"dynamic: {name} is given two ranges, {ranges[name]} and {(lo, hi)}")
            dims.append(DynamicDim(inp, axis, name, lo, hi))
    return tuple(d if isinstance(d, DynamicDim) else DynamicDim(*d, *ranges.get(d[2], (1, None))) for d in dims)


def _check_quant(q: QuantOptions) -> QuantOptions:
    _one_of("quantize", q.scheme, QUANT_SCHEMES)
    _one_of("observer", q.observer, OBSERVERS)
    if q.scheme == "int8-static" and not q.calibration:
        raise KilnError("quantize='int8-static' needs calibration=[inputs, ...] (a few representative batches)")
    if q.scheme == "int4-weight" and q.group_size not in INT4_GROUP_SIZES:
        raise KilnError(f"group_size must be one of {_choices(INT4_GROUP_SIZES)}, got {q.group_size!r}")
    if q.min_sqnr is not None and not isinstance(q.min_sqnr, (int, float)):
        raise KilnError(f"min_sqnr must be a number of dB, got {q.min_sqnr!r}")
    _bool("quantize_payoff", q.measure_payoff)
    return q


def _with_quantize(options: CompileOptions, scheme, extra: dict) -> CompileOptions:
    _one_of("quantize", scheme, QUANTIZE_VALUES)
    given = sorted(k for k, v in extra.items() if v is not None)
    if scheme == "none":
        if given:
            raise KilnError(f"option(s) {', '.join(given)} need quantize=...")
        return options.replace(quantize=None)
    if scheme == "bf16":
        if given:
            raise KilnError(f"option(s) {', '.join(given)} apply to integer quantization, not quantize='bf16'")
        if options.precision not in ("fp32", "bf16"):
            raise KilnError(f"quantize='bf16' conflicts with precision={options.precision!r}")
        return options.replace(precision="bf16", quantize=None)
    if extra.get("observer") is not None and scheme != "int8-static":
        raise KilnError(f"observer= applies to quantize='int8-static', not {scheme!r}")
    if extra.get("group_size") is not None and scheme != "int4-weight":
        raise KilnError(f"group_size ({_choices(INT4_GROUP_SIZES)}) applies to quantize='int4-weight' only")
    q = QuantOptions(scheme, calibration_batches(extra.get("calibration")),
                     extra.get("observer") or "minmax", extra.get("group_size") or 128, extra.get("min_sqnr"),
                     True if extra.get("quantize_payoff") is None else extra["quantize_payoff"])
    return options.replace(quantize=_check_quant(q))


def calibration_batches(batches) -> tuple:
    """Calibration batches as tuples of tensors: each batch is the model's positional inputs
    (a tuple, or one tensor), flattened to its tensor leaves."""
    if batches is None:
        return ()
    import torch
    import torch.utils._pytree as pytree

    out = []
    try:
        for item in batches:
            item = (item,) if isinstance(item, torch.Tensor) else tuple(item)
            out.append(tuple(x.contiguous() for x in pytree.tree_leaves(item) if isinstance(x, torch.Tensor)))
    except TypeError:
        raise KilnError("calibration must be a list of input batches (each a tuple of tensors, or one tensor)") \
            from None
    return tuple(out)


# ----------------------------------------------------------------------------- environment
@dataclass(frozen=True)
class EnvVar:
    """One KILN_* environment variable: its name, default and meaning."""
    name: str
    default: str
    doc: str


ENVIRONMENT = (
    EnvVar("KILN_CACHE_DIR", "~/.cache/kiln", "where every cache Kiln keeps lives (compile, import, "
                                              "generated modules, tuning database)"),
    EnvVar("KILN_CACHE", "1", "0 turns the compile and import caches off"),
    EnvVar("KILN_CACHE_MAX_MB", "2048", "size bound of the compile cache (least recently used out first)"),
    EnvVar("KILN_TVM_CACHE_MAX_MB", "512", "size bound of the generated-kernel module cache"),
    EnvVar("KILN_TUNING_DB", "<KILN_CACHE_DIR>/tuning.sqlite", "the tuning database file"),
    EnvVar("KILN_VERIFY", "0", "1 runs the IR verifier after every pass (the default of verify=)"),
    EnvVar("KILN_KERNEL_CHOICE", "measure", "'first': take the first accepting kernel, no timing (debugging)"),
    EnvVar("KILN_GROUP_CHOICE", "measure", "'generated': a generated group kernel that agrees with the "
                                           "reference wins without timing (debugging)"),
    EnvVar("KILN_TVM_THREAD_POOL", "0", "1 runs generated kernels' parallel loops on TVM's own thread pool "
                                        "instead of torch's OpenMP workers"),
    EnvVar("KILN_BUILD_JOBS", "0", "parallel Triton builds ahead of time (0: up to 4, one per core)"),
    EnvVar("KILN_CUDA_GRAPHS", "1", "0 runs cuda plans kernel by kernel instead of as one CUDA graph"),
    EnvVar("KILN_PROGRESS", "1", "0 hides progress bars"),
    EnvVar("KILN_MALLOC", "pool", "'pool': torch's CPU buffers of 1 MiB and more come from Kiln's caching "
                                  "allocator and glibc's thresholds are set for the rest; 'tuned': only the "
                                  "thresholds; 'system': neither (once per process, see kiln.kernels.allocator)"),
    EnvVar("KILN_LOG", "", "comma-separated areas to log to stderr (frontend, passes, tune, codegen, "
                           "runtime, bench, all)"),
)


@dataclass(frozen=True)
class Settings:
    """The KILN_* environment variables, read and validated once."""
    cache_dir: str
    cache: bool
    cache_max_bytes: int
    tvm_cache_max_bytes: int
    tuning_db: str
    verify: bool
    kernel_choice: str  # "measure" | "first"
    group_choice: str  # "measure" | "generated"
    tvm_thread_pool: bool
    build_jobs: int
    cuda_graphs: bool
    progress: bool
    log_areas: frozenset = field(default_factory=frozenset)
    user_tvm_threads: bool = False  # TVM_NUM_THREADS set by the user: Kiln leaves TVM's pool alone
    # OMP_WAIT_POLICY=PASSIVE (read by OpenMP when torch loads it, not by Kiln): idle workers
    # sleep at once instead of spinning; benchmarks give the other engines' pools the same policy
    omp_passive: bool = False
    malloc: str = "pool"  # "pool" | "tuned" | "system" (KILN_MALLOC): see kiln.kernels.allocator


def _env(name: str) -> str:
    return os.environ.get(name, "")


def _megabytes(name: str, default: float) -> int:
    raw = _env(name)
    try:
        return int(float(raw or default) * 1024 * 1024)
    except ValueError:
        raise KilnError(f"{name} must be a number of megabytes, got {raw!r}") from None


def settings() -> Settings:
    """The environment as typed settings, read now (cheap; tests change the environment)."""
    cache_dir = _env("KILN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    jobs = _env("KILN_BUILD_JOBS") or "0"
    if not jobs.isdigit():
        raise KilnError(f"KILN_BUILD_JOBS must be a non-negative integer, got {jobs!r}")
    malloc = _env("KILN_MALLOC") or "pool"
    if malloc not in ("pool", "tuned", "system"):
        raise KilnError(f"KILN_MALLOC must be 'pool', 'tuned' or 'system', got {malloc!r}")
    return Settings(
        cache_dir=cache_dir,
        cache=_env("KILN_CACHE") != "0",
        cache_max_bytes=_megabytes("KILN_CACHE_MAX_MB", 2048),
        tvm_cache_max_bytes=_megabytes("KILN_TVM_CACHE_MAX_MB", 512),
        tuning_db=_env("KILN_TUNING_DB") or os.path.join(cache_dir, "tuning.sqlite"),
        verify=_env("KILN_VERIFY") == "1",
        kernel_choice="first" if _env("KILN_KERNEL_CHOICE") == "first" else "measure",
        group_choice="generated" if _env("KILN_GROUP_CHOICE") == "generated" else "measure",
        tvm_thread_pool=_env("KILN_TVM_THREAD_POOL") == "1",
        build_jobs=int(jobs),
        cuda_graphs=_env("KILN_CUDA_GRAPHS") != "0",
        progress=_env("KILN_PROGRESS") != "0",
        log_areas=frozenset(a for a in _env("KILN_LOG").split(",") if a),
        user_tvm_threads="TVM_NUM_THREADS" in os.environ,
        omp_passive=_env("OMP_WAIT_POLICY").strip().lower() == "passive",
        malloc=malloc,
    )


def child_environment(**variables: str) -> dict[str, str]:
    """The environment for a subprocess (a benchmark's fresh compile): this process's, with
    ``variables`` set (``KILN_CACHE_DIR="/tmp/x"``)."""
    return {**os.environ, **variables}


def cache_subdir(sub: str) -> str:
    """``<KILN_CACHE_DIR>/<sub>``, created when missing."""
    d = os.path.join(settings().cache_dir, sub)
    os.makedirs(d, exist_ok=True)
    return d


def configure_tvm_environment(threads: int | None = None) -> None:
    """The environment TVM's runtime reads when it (re)configures its thread pool.

    Its pool threads spin-wait for the next parallel loop by default, taking cores from the
    torch/oneDNN kernels that run between generated ones: Kiln lets them sleep at once.
    With ``threads``, the pool is capped at that many unpinned threads (TVM pins them, the
    caller included, unless told not to). The only environment writes Kiln makes."""
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
        os.environ["TVM_BIND_THREADS"] = "0"
