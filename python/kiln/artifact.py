"""``kiln.save`` / ``kiln.load``: a compiled model as one deployable file.

An artifact (``model.kiln``; the container is ``kiln.artifact_io``: a zip of stored members)
holds

* ``manifest.json`` — format and Kiln versions, the target it was built for (CPU name and
  features), the options, the inputs (names, dtypes, shapes, pytree structure), one record
  per plan, the weights index and the SHA-256 of every other member;
* ``plans/<i>/graph.json`` — each plan's optimized IR graph (``kiln.ir`` JSON, constants by
  name);
* ``weights.safetensors`` — every constant of every plan, a tensor that several nodes or
  plans share stored once, and the portable tensors kernels derived from them
  (``kiln.kernels.derived``: Winograd's transformed filters);
* ``kernels/<sha256>.so`` — the generated group kernels as exported TVM modules.

A plan record is its input signature (the shapes and dtypes it serves, as IR types: a
symbolic dim keeps its name), the kernel each node runs in, the kernel groups it runs over
and which generated module each group kernel is. ``kiln.load`` rebuilds each plan from
those recorded choices (``kiln.runtime.restore``): no ``torch.export``, no passes, no
measuring, no code generator — only the TVM runtime library to load the modules. Weights
are stored as the optimized graph holds them (folded, cast, quantized) and prepacked by
their kernels at load, as a compile does — except where the packed form is portable (Kiln's
own arithmetic, not a library's CPU-specific format): that is stored too, and mapped.

An artifact holds native code: load only artifacts you would trust as a shared library.
``rebuild_kernels=True`` builds the generated kernels again from the saved IR instead of
loading the shipped modules (TVM's compiler needed).
"""
from __future__ import annotations

import datetime
import gc
import os
import tempfile
import time
import warnings

import torch

from . import __version__
from .api import CompiledModel, ModelState
from .artifact_io import MANIFEST, Reader, Writer, sha256
from .artifact_records import (decisions, dumps_tree, dynamic_from, dynamic_record, key_from, key_record,
                               loads_tree, options_from, options_record, report_record, spec_from, spec_record,
                               target_from, target_record, unpermute, validate)
from .driver import Compiled
from .errors import KilnError, KilnWarning
from .options import CompileOptions, cache_subdir, settings
from .report import CompileReport
from .target import Target

FORMAT = "kiln-artifact"
# Bumped whenever a change would make an older Kiln misread a newer file or the reverse;
# a file of another version is refused with both versions named.
FORMAT_VERSION = 1
WEIGHTS = "weights.safetensors"


# ============================================================================= save
def save(compiled, path) -> None:
    """Write ``compiled`` (a ``kiln.compile`` result, every specialization it holds) to
    ``path`` as one file. Atomic: ``path`` is replaced only once the file is complete."""
    if not isinstance(compiled, CompiledModel):
        raise KilnError(f"kiln.save takes what kiln.compile returns, got {type(compiled).__name__}")
    state = compiled.state()
    if not state.plans:
        raise KilnError(f"{state.name} has not been compiled yet: pass example inputs to kiln.compile, "
                        f"or call it once, before saving")
    target = state.options.resolved_target()
    if target.kind != "cpu":
        raise KilnError(f"saving {target.kind} models is not supported yet: only cpu plans are rebuilt from "
                        f"recorded kernel choices (cuda plans are built with Triton at compile time, and their "
                        f"kernels are not shipped)")
    with Writer(path) as w:
        weights = _Weights()
        kernels: dict[str, str] = {}  # module file -> member
        plans = [_save_plan(w, weights, kernels, i, key, c, state.options) for i, (key, c) in enumerate(state.plans)]
        index = w.add_tensors(WEIGHTS, weights.tensors)
        for name, perm in weights.perms.items():
            index[name]["perm"] = perm
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kiln_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": state.name, "source": "onnx" if state.is_onnx else "torch",
            "target": target_record(target), "options": options_record(state.options),
            "inputs": {"spec": [spec_record(s) for s in state.spec or ()],
                       "tree": dumps_tree(state.in_tree), "tensor_args": state.tensor_args,
                       "value_inputs": sorted(state.value_inputs), "dynamic": dynamic_record(state.dynamic)},
            "plans": plans,
            "weights": {"member": WEIGHTS, "tensors": index},
            "members": dict(w.members),
        }
        w.finish(manifest)


class _Weights:
    """Every plan's constants, each distinct tensor once (by content: the same weight in two
    plans, or two nodes' equal constants, is one entry)."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.perms: dict[str, list[int]] = {}
        self._seen: dict[tuple, str] = {}

    def add(self, name: str, t: torch.Tensor) -> str:
        stored, perm = _storage_order(t)
        if stored.dtype not in _SAFE_DTYPES:
            raise KilnError(f"constant {name!r} has dtype {stored.dtype}, which an artifact cannot hold yet")
        data = stored.reshape(-1).view(torch.uint8).numpy() if stored.numel() else b""
        key = (stored.dtype, tuple(stored.shape), tuple(perm or ()), sha256(data))
        if key in self._seen:
            return self._seen[key]
        unique, i = name or "w", 1
        while unique in self.tensors or unique == "__metadata__":
            unique, i = f"{name}.{i}", i + 1
        self.tensors[unique] = stored
        if perm is not None:
            self.perms[unique] = perm
        self._seen[key] = unique
        return unique


_SAFE_DTYPES = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
                torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32, torch.uint64}


def _storage_order(t: torch.Tensor) -> tuple[torch.Tensor, list[int] | None]:
    """``t`` as a contiguous tensor in its memory order, and the permutation that gives ``t``
    back (None: it was contiguous). A channels-last weight is stored as it lies in memory
    and loads with the same strides, so its kernels see exactly what they saw."""
    t = t.detach()
    if t.is_contiguous():
        return t, None
    perm = sorted(range(t.dim()), key=lambda d: -t.stride(d))
    p = t.permute(perm)
    if p.is_contiguous():  # dense, no overlap: a permutation of a contiguous tensor
        return p, perm
    return t.contiguous(), None


def _save_plan(w: Writer, weights: _Weights, kernels: dict, i: int, key: tuple, c: Compiled,
               options: CompileOptions) -> dict:
    from kiln.ir import to_json
    from kiln.ir.serialize import SerializeError, encode

    g = c.graph
    refs = {v: weights.add(v.name, t) for v, t in g.constants.items()}
    member = f"plans/{i}/graph.json"
    w.add(member, to_json(g, refs).encode())
    try:
        literals = {str(k): encode(v) for k, v in c.out_literals.items()}
    except SerializeError as e:
        raise KilnError(f"cannot save an output that is the constant {e}") from None
    rec = {"key": key_record(key), "graph": member,
           "signature": {"inputs": [encode(v.type) for v in g.inputs], "outputs": [encode(v.type) for v in g.outputs]},
           "input_names": list(c.input_names), "out_spec": dumps_tree(c.out_spec), "out_literals": literals,
           "report": report_record(c.report)}
    if c.plan.target.kind == "cpu":
        from kiln.runtime.restore import groups_of

        rec["node_kernels"] = list(c.plan.node_kernels)
        rec["groups"] = groups_of(c.partition) if options.codegen else None
        rec["generated"] = _save_kernels(w, kernels, c.plan)
        rec["derived"] = _save_derived(weights, g, c.plan.node_kernels, refs)
    return rec


def _save_derived(weights: _Weights, g, node_kernels: list, refs: dict) -> list[dict]:
    """The portable tensors the plan's kernels derived from its constants
    (``kernels.derived``: Winograd's transformed filters), stored so a load maps them instead
    of computing them again: one record per (node, operand, kernel)."""
    from kiln.kernels.derived import made
    from kiln.runtime.by_size import member_kernels

    out = []
    for i, (n, recorded) in enumerate(zip(g.nodes, node_kernels)):
        try:
            names = member_kernels(recorded)
        except ValueError:
            continue
        for j, v in enumerate(n.inputs):
            t = None if v is None else g.constants.get(v)
            if t is None:
                continue
            for k in names:
                hit = made(k, t)
                if hit is not None:
                    out.append({"kernel": k, "version": hit[0], "node": i, "input": j,
                                "tensor": weights.add(f"{refs[v]}@{k}", hit[1])})
    return out


def _save_kernels(w: Writer, kernels: dict, plan) -> dict:
    """Each generated kernel of ``plan`` as a member (the module cache's exported file)."""
    from kiln.codegen.tvm_runtime import GeneratedKernel
    from kiln.runtime.module_cache import module_file

    out = {}
    for s in plan.steps:
        k = s.fn
        if not isinstance(k, GeneratedKernel) or s.kernel in out:
            continue
        path = module_file(k.group, k.config, plan.target, k.threads)
        if path not in kernels:
            with open(path, "rb") as f:
                data = f.read()
            kernels[path] = f"kernels/{sha256(data)[:32]}.so"
            if kernels[path] not in w.members:
                w.add(kernels[path], data)
        out[s.kernel] = {"member": kernels[path], "config": k.config, "threads": k.threads}
    return out


# ============================================================================= load
def load(path, *, strict: bool = False, target=None, rebuild_kernels: bool = False,
         map_weights: bool = True, freeze_gc: bool = True) -> CompiledModel:
    """The compiled model saved at ``path``, ready to call; nothing is measured or compiled.

    ``strict``: raise when a recorded kernel cannot run here (a CPU feature missing, ...)
    instead of choosing that node's kernel again. ``target``: the CPU to load for (default:
    this one; a ``kiln.target.Target`` with fewer features simulates another machine).
    ``rebuild_kernels``: build the generated kernels again from the saved IR rather than
    load the shipped native modules. ``map_weights``: the weights are the file's own pages
    (mapped copy-on-write: no copy, shared by every process that loads the file); replace
    a loaded artifact by renaming a new file over it (as ``kiln.save`` does), never by
    writing into it — or load with ``map_weights=False`` to read them into private memory.
    ``freeze_gc``: first move every object alive in the process (the libraries imported so
    far: torch alone is some 170,000 objects) out of the cyclic garbage collector's
    generations (``gc.freeze()``), so that no collection, during the load or after it while
    the model serves, scans them again; without it, the full collection that the load's own
    allocations make due walks all of them, most of a small model's load. The cost: a
    reference cycle that was already garbage at that moment is never freed (undo with
    ``gc.unfreeze()``).

    Anything wrong with the file raises ``KilnError`` naming the problem, before a model is
    returned.
    """
    t0 = time.perf_counter()
    if freeze_gc:
        gc.freeze()
    secs: dict[str, float] = {}  # where the load's time went (every plan's report.seconds)
    import kiln.runtime.restore  # noqa: F401  (the plan builder and the kernel registry: timed apart)
    from kiln.kernels.registry import all_kernels

    all_kernels()
    secs["imports"] = time.perf_counter() - t0
    with Reader(path) as r:
        m = r.manifest()
        _check_format(m, r.path)
        try:
            validate(m)
        except KilnError as e:
            raise KilnError(f"{r.path}: {e}") from None
        try:
            built_for = target_from(m["target"])
            here = _load_target(built_for, target, r.path)
            options = options_from(m["options"], here)
            plans_rec, inputs = list(m["plans"]), m["inputs"]
            members, wrec = m["members"], m["weights"]
            index = wrec["tensors"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KilnError(f"{r.path}: the manifest is incomplete or damaged ({type(e).__name__}: {e})") from None
        if not plans_rec:
            raise KilnError(f"{r.path} holds no plans")
        t1 = time.perf_counter()
        secs["manifest"] = t1 - t0 - secs["imports"]
        tensors = r.tensors(wrec["member"], index, threads=min(4, os.cpu_count() or 1), mapped=map_weights)
        for name, rec in index.items():
            if rec.get("perm") is not None:
                tensors[name] = unpermute(tensors[name], rec["perm"], name, r.path)
        t2 = time.perf_counter()
        secs["read_weights"] = t2 - t1
        try:
            dynamic = dynamic_from(inputs.get("dynamic"))
        except KilnError as e:
            raise KilnError(f"{r.path}: {e}") from None
        sizes = dynamic.hints if dynamic is not None else None  # where a kernel chosen again is measured
        generated_ok, why_not = _generated_loadable(built_for, here, rebuild_kernels, plans_rec)
        secs["runtime"] = time.perf_counter() - t2
        if strict and not generated_ok:
            raise KilnError(f"{r.path}: its generated kernels cannot run here ({why_not}) and strict=True")
        plans, name = [], str(m.get("model", "model"))
        for rec in plans_rec:
            try:
                tk = time.perf_counter()
                shipped = _shipped(r, rec, members, rebuild_kernels) if generated_ok else None
                _add(secs, "kernels", time.perf_counter() - tk)
                c = _load_plan(r, name, rec, members, tensors, here, options, shipped, strict, rebuild_kernels, secs,
                               sizes)
                key = key_from(rec["key"])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise KilnError(f"{r.path}: a plan record is incomplete or damaged ({type(e).__name__}: {e})") from None
            plans.append((key, c))
    rechosen = [x for _, c in plans for x in c.report.rechosen]
    if rechosen:
        warnings.warn(f"{len(rechosen)} kernel(s) recorded in {r.path} cannot run here and were chosen again "
                      f"(first: {rechosen[0][0]}: {rechosen[0][1]}, {rechosen[0][2]}); kiln.load(strict=True) "
                      f"refuses instead", KilnWarning, stacklevel=2)
    t3 = time.perf_counter()
    try:
        spec = [spec_from(s) for s in inputs["spec"]]
        state = ModelState(name, options, m.get("source") == "onnx", spec,
                           loads_tree(inputs["tree"], r.path), inputs["tensor_args"],
                           set(inputs["value_inputs"]), plans, dynamic)
        for (_, c), rec in zip(plans, plans_rec):
            c.out_spec = loads_tree(rec.get("out_spec"), r.path)
            leaves = len(c.graph.outputs) + len(c.out_literals)
            if (c.out_spec is not None and c.out_spec.num_leaves != leaves) or \
                    any(not 0 <= i < leaves for i in c.out_literals):
                raise KilnError(f"{r.path}: a plan's output structure does not match its graph's outputs")
    except (KeyError, TypeError, ValueError) as e:
        raise KilnError(f"{r.path}: the manifest's input description is damaged ({e})") from None
    secs["structure"] = time.perf_counter() - t3
    secs["total"] = time.perf_counter() - t0
    for _, c in plans:
        c.report.seconds = dict(secs)
    return CompiledModel.from_state(state)


def _add(secs: dict, key: str, seconds: float) -> None:
    secs[key] = secs.get(key, 0.0) + seconds


def _check_format(m: dict, path: str) -> None:
    if m.get("format") != FORMAT:
        raise KilnError(f"{path} is not a Kiln artifact (its manifest's format is {m.get('format')!r})")
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        newer = isinstance(v, int) and v > FORMAT_VERSION
        raise KilnError(f"{path} is a Kiln artifact of format version {v!r} (written by Kiln "
                        f"{m.get('kiln_version', '?')}); this Kiln ({__version__}) reads format version "
                        f"{FORMAT_VERSION}" + ("; upgrade Kiln to load it" if newer else "; compile and save it again"))


def _load_target(built_for: Target, target, path: str) -> Target:
    if built_for.kind == "cuda":
        if target is not None and Target.parse(target).kind != "cuda":
            raise KilnError(f"{path} was compiled for {built_for}; it cannot be loaded for {Target.parse(target)}")
        if not torch.cuda.is_available():
            raise KilnError(f"{path} was compiled for {built_for} (a CUDA GPU) and this machine has no CUDA device "
                            f"(torch.cuda.is_available() is False): compile the model for the CPU and save that")
        raise KilnError(f"{path} was compiled for {built_for}: loading cuda artifacts is not supported yet "
                        f"(their plans are built with Triton at compile time; compile on the GPU machine instead)")
    here = Target.parse(target) if target is not None else Target.parse("cpu")
    if here.kind != built_for.kind:
        raise KilnError(f"{path} was compiled for {built_for}; it cannot be loaded for {here}")
    return here


def _generated_loadable(built_for: Target, here: Target, rebuild: bool, plans_rec) -> tuple[bool, str]:
    """Whether the shipped generated modules (or, with ``rebuild``, ones built here) can run."""
    if not any(rec.get("generated") for rec in plans_rec):
        return True, ""
    if rebuild:
        try:
            import tvm  # noqa: F401  (the compiler itself)
        except ImportError:
            return False, "rebuild_kernels=True needs apache-tvm's compiler"
        return True, ""
    # the CPU name is derived from the features (kiln.target), so a superset of the features
    # runs the code: a newer CPU loads an older one's kernels
    missing = built_for.features - here.features
    if missing:
        return False, f"they were built for {built_for.arch} and need CPU features {', '.join(sorted(missing))}"
    try:
        from kiln.codegen.tvm_runtime import load_runtime

        load_runtime()
    except (ImportError, OSError) as e:
        return False, f"the TVM runtime library does not load ({e})"
    return True, ""


def _shipped(r: Reader, rec: dict, members: dict, rebuild: bool) -> dict:
    from kiln.runtime.restore import ShippedKernel

    out = {}
    for name, k in (rec.get("generated") or {}).items():
        path = "" if rebuild else _extract(r.read(k["member"], members.get(k["member"], {})), r.path)
        out[name] = ShippedKernel(name, path, dict(k["config"]), int(k["threads"]))
    return out


def _extract(data: bytes, source: str) -> str:
    """A verified module's bytes as a file the dynamic loader can open: content-addressed
    under the cache (``<KILN_CACHE_DIR>/artifacts``), written atomically, reused when the
    file there still has the same hash, kept under ``KILN_TVM_CACHE_MAX_MB`` with the rest
    of that folder."""
    from kiln.runtime.cache import evict_lru
    digest = sha256(data)
    try:
        folder = cache_subdir("artifacts")
    except OSError:
        folder = tempfile.mkdtemp(prefix="kiln-artifact-")
    path = os.path.join(folder, f"{digest}.so")
    if os.path.exists(path):
        with open(path, "rb") as f:
            if sha256(f.read()) == digest:
                os.utime(path)  # recently used: evicted last
                return path
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".so")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    # the folder stays under the module cache's bound (a process that loaded an evicted file
    # keeps its mapping; the next load writes it again)
    evict_lru(folder, settings().tvm_cache_max_bytes, lambda name: name.endswith(".so"))
    return path


def _load_plan(r: Reader, name: str, rec: dict, members: dict, tensors: dict, here: Target, options: CompileOptions,
               shipped, strict: bool, rebuild: bool, secs: dict, sizes: dict | None = None) -> Compiled:
    from kiln.ir import SerializeError, VerifyError, from_json, verify
    from kiln.ir.serialize import decode
    from kiln.kernels.derived import seeded
    from kiln.runtime.restore import restore_plan

    t0 = time.perf_counter()
    path, member = r.path, rec["graph"]
    text = r.read(member, members.get(member, {}))
    try:
        graph = verify(from_json(text.decode(), resolve=tensors.get))
    except (SerializeError, VerifyError, KeyError, TypeError, ValueError, IndexError) as e:
        raise KilnError(f"{path}: {member} does not describe a valid graph with the saved weights ({e})") from None
    t1 = time.perf_counter()
    with seeded(_derived_entries(rec.get("derived") or (), graph, tensors, path)):
        plan, missing = restore_plan(graph, here, rec["node_kernels"], rec.get("groups"), shipped,
                                     strict=strict, rebuild=rebuild, exclude=options.exclude_kernels, sizes=sizes,
                                     batch_chunk=options.batch_chunk)
    _add(secs, "graphs", t1 - t0)
    _add(secs, "kernels", plan.codegen_seconds)  # loading the generated modules
    _add(secs, "prepare", time.perf_counter() - t1 - plan.codegen_seconds)
    rep = rec.get("report", {})
    report = CompileReport(
        model=name, target=str(here), options=options,
        input_shapes=tuple(tuple(v.type.shape) for v in graph.inputs),
        fallbacks=[tuple(f) for f in rep.get("fallbacks", ())], kernels=dict(plan.kernel_names),
        node_kernels=[(n.op.value + (f" ({n.scope})" if n.scope else ""), k)
                      for n, k in zip(graph.nodes, plan.node_kernels)],
        quantization=decisions(rep.get("quantization"), "kiln.passes.quantize_payoff", "LayerDecision"),
        sparsity=decisions(rep.get("sparsity"), "kiln.passes.sparsity", "SparseDecision"),
        memory=plan.memory, graph_nodes=len(graph.nodes), artifact=str(path),
        rechosen=[(u.label, u.kernel, u.why) for u in missing], batch_chunks=plan.chunking)
    try:
        literals = {int(k): decode(v) for k, v in rec.get("out_literals", {}).items()}
    except SerializeError as e:
        raise KilnError(f"{path}: a plan's constant outputs are damaged ({e})") from None
    return Compiled(plan, graph, None, literals, list(rec["input_names"]), report)  # out_spec: set by load


def _derived_entries(records, graph, tensors: dict, path: str) -> list[tuple]:
    """(kernel, version, constant, tensor) for ``kernels.derived.seeded`` from a plan's
    records; a kernel takes one only if its version and shape are what it would make."""
    out = []
    for d in records:
        try:
            if d["node"] < 0 or d["input"] < 0:
                raise IndexError("a negative index")
            v = graph.nodes[d["node"]].inputs[d["input"]]
            out.append((d["kernel"], d["version"], graph.constants[v], tensors[d["tensor"]]))
        except (IndexError, KeyError, TypeError) as e:
            raise KilnError(f"{path}: a plan's derived-weight record does not fit its graph and weights "
                            f"({type(e).__name__}: {e})") from None
    return out


def read_graph(path, plan: int = 0):
    """Plan ``plan``'s optimized graph with its weights, checked, without building the plan."""
    from kiln.ir import SerializeError, VerifyError, from_json, verify

    with Reader(path) as r:
        m = r.manifest()
        _check_format(m, r.path)
        try:
            rec, index = m["plans"][plan], m["weights"]["tensors"]
            member, expect = rec["graph"], m["members"].get(rec["graph"], {})
        except (KeyError, TypeError, IndexError) as e:
            raise KilnError(f"{r.path}: no plan {plan} ({type(e).__name__}: {e})") from None
        tensors = r.tensors(m["weights"]["member"], index)
        for name, w in index.items():
            if w.get("perm") is not None:
                tensors[name] = unpermute(tensors[name], w["perm"], name, r.path)
        try:
            return verify(from_json(r.read(member, expect).decode(), resolve=tensors.get))
        except (SerializeError, VerifyError, KeyError, TypeError, ValueError) as e:
            raise KilnError(f"{r.path}: {member} is not a valid graph ({e})") from None


def info(path) -> dict:
    """The manifest of the artifact at ``path`` (checked for format), plus its file size."""
    with Reader(path) as r:
        m = r.manifest()
        _check_format(m, r.path)
        m["file_bytes"] = r.size
        m["member_bytes"] = {name: i.file_size for name, i in r.infos.items() if name != MANIFEST}
    return m
