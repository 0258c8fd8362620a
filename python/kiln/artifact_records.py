"""The records of an artifact's manifest: how targets, options, inputs, plan keys, reports
and pytree structures are written, read back, and checked.

``validate`` checks a manifest against ``MANIFEST`` (every field ``kiln.load`` reads, with
its JSON type) before anything is built from it, so a damaged or foreign manifest is a
``KilnError`` naming the field, not an exception from deep inside the loader.
"""
from __future__ import annotations

import dataclasses
import importlib
import json

import torch
import torch.utils._pytree as pytree

from .api import InputSpec
from .errors import KilnError
from .options import OBSERVERS, QUANT_SCHEMES, CompileOptions, QuantOptions
from .report import CompileReport
from .target import Target


# ============================================================================= schema
class Map:
    """A JSON object with any string keys, each value of ``schema``."""

    def __init__(self, schema):
        self.schema = schema


ANY = object()
_NUMBER = (int, float)
_SPEC = {"name": str, "dtype": (str, None), "shape": [int], "device": str, "value": ANY}
_PLAN = {"key": [ANY], "graph": str, "signature": {"inputs": [ANY], "outputs": [ANY]}, "input_names": [str],
         "out_spec": (str, None), "out_literals": Map(ANY), "report": dict, "node_kernels": [str],
         "groups": ([[ANY]], None), "generated": Map({"member": str, "config": dict, "threads": int}),
         "?derived": [{"kernel": str, "version": int, "node": int, "input": int, "tensor": str}]}
MANIFEST = {
    "format": str, "format_version": int, "kiln_version": str, "?torch_version": str, "?created": str,
    "model": str, "source": str,
    "target": {"kind": str, "arch": str, "features": [str], "cores": int, "?device_name": str, "?key": str},
    "options": {"precision": str, "sparse": str, "tune": (str, int, float, None), "codegen": bool,
                "threads": (int, None), "exclude_kernels": [str], "passes": ([str], None), "?verify": bool,
                "max_specializations": int, "?size_buckets": int, "?batch_chunk": (int, None),
                "quantize": ({"scheme": str, "observer": str, "group_size": int, "min_sqnr": (int, float, None),
                              "measure_payoff": bool}, None)},
    "inputs": {"spec": [_SPEC], "tree": (str, None), "tensor_args": (int, None), "value_inputs": [int]},
    "plans": [_PLAN],
    "weights": {"member": str, "tensors": Map({"dtype": str, "shape": [int], "crc32": str, "?perm": [int]})},
    "members": Map({"?sha256": str, "bytes": int}),
}


def validate(value, schema=MANIFEST, where: str = "") -> None:
    """Raise ``KilnError`` naming the first field of ``value`` that does not fit ``schema``:
    a type, a tuple of alternatives (``None`` for null), ``[item]``, ``{"key": ...}`` (``"?key"``
    optional; other keys allowed, for additions), ``Map(value)`` or ``ANY``."""
    if schema is ANY:
        return
    if isinstance(schema, tuple):
        for alt in schema:
            try:
                validate(value, alt, where)
                return
            except KilnError:
                pass
        raise KilnError(f"the manifest is damaged: {where or 'it'} is {_short(value)}, not a valid value there")
    if schema is None:
        if value is not None:
            raise KilnError(f"the manifest is damaged: {where or 'it'} should be null, got {_short(value)}")
        return
    if isinstance(schema, type):
        ok = isinstance(value, schema) and not (schema in (int, float) and isinstance(value, bool))
        if not ok:
            raise KilnError(f"the manifest is damaged: {where or 'it'} should be {_JSON.get(schema, schema.__name__)}, "
                            f"got {_short(value)}")
        return
    if isinstance(schema, list):
        validate(value, list, where)
        for i, item in enumerate(value):
            validate(item, schema[0], f"{where}[{i}]")
        return
    if isinstance(schema, Map):
        validate(value, dict, where)
        for k, v in value.items():
            validate(v, schema.schema, f"{where}[{k!r}]")
        return
    validate(value, dict, where)
    for key, sub in schema.items():
        name = key.lstrip("?")
        if name in value:
            validate(value[name], sub, f"{where}.{name}" if where else name)
        elif not key.startswith("?"):
            raise KilnError(f"the manifest is incomplete: it has no {f'{where}.{name}' if where else name}")


_JSON = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
         list: "a list"}


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, (set, bytes)) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ============================================================================= records
def target_record(t: Target) -> dict:
    return {"kind": t.kind, "arch": t.arch, "features": sorted(t.features), "cores": t.cores,
            "device_name": t.device_name, "key": t.key()}


def target_from(d: dict) -> Target:
    return Target(str(d["kind"]), str(d["arch"]), frozenset(map(str, d["features"])), int(d["cores"]),
                  str(d.get("device_name", "")))


def options_record(o: CompileOptions) -> dict:
    q = None if o.quantize is None else {f.name: getattr(o.quantize, f.name)
                                         for f in dataclasses.fields(o.quantize) if f.name != "calibration"}
    return {"precision": o.precision, "quantize": q, "sparse": o.sparse, "tune": o.tune, "codegen": o.codegen,
            "threads": o.threads, "exclude_kernels": sorted(o.exclude_kernels),
            "passes": None if o.passes is None else list(o.passes), "verify": o.verify,
            "max_specializations": o.max_specializations, "size_buckets": o.size_buckets,
            "batch_chunk": o.batch_chunk}


def options_from(d: dict, target: Target) -> CompileOptions:
    """The saved options, checked as ``kiln.compile``'s keywords are (``KilnError`` on a bad
    value). The quantization scheme is checked on its own: its calibration data was used up
    by the compile (the saved weights hold its result), so none comes back."""
    options = CompileOptions.parse(
        target=target, precision=d["precision"], sparse=d["sparse"], tune=d["tune"], codegen=d["codegen"],
        threads=d["threads"], exclude_kernels=list(d["exclude_kernels"]), passes=d["passes"],
        verify=d.get("verify", False), max_specializations=d["max_specializations"],
        size_buckets=d.get("size_buckets", 1), batch_chunk=d.get("batch_chunk"))
    q = d.get("quantize")
    if q is None:
        return options
    if q["scheme"] not in QUANT_SCHEMES or q["observer"] not in OBSERVERS:
        raise KilnError(f"the manifest's quantization scheme {q['scheme']!r} / observer {q['observer']!r} is not "
                        f"one this Kiln knows")
    return options.replace(quantize=QuantOptions(q["scheme"], (), q["observer"], q["group_size"], q["min_sqnr"],
                                                 q["measure_payoff"]))


def spec_record(s: InputSpec) -> dict:
    from kiln.ir.serialize import encode

    return {"name": s.name, "dtype": None if s.dtype is None else str(s.dtype).removeprefix("torch."),
            "shape": list(s.shape), "device": s.device, "value": encode(s.value)}


def spec_from(d: dict) -> InputSpec:
    from kiln.ir.serialize import decode

    dtype = None if d["dtype"] is None else dtype_named(d["dtype"])
    return InputSpec(str(d["name"]), dtype, tuple(d["shape"]), str(d["device"]), decode(d["value"]))


def dtype_named(name: str) -> torch.dtype:
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise KilnError(f"the manifest names an unknown dtype {name!r}")
    return dt


def key_record(key: tuple) -> list:
    """A plan key (``CompiledModel._key``) as JSON: ``["threads", n]``, ``["v", repr]``, or
    ``{"shape", "dtype"[, "values"]}`` per input."""
    out = []
    for e in key:
        if e[0] in ("threads", "v"):
            out.append([e[0], e[1]])
        else:
            rec = {"shape": list(e[0]), "dtype": str(e[1]).removeprefix("torch.")}  # a dim name where it varies
            if len(e) > 2:
                rec["values"] = list(e[2])
            out.append(rec)
    return out


def key_from(rec: list) -> tuple:
    """A plan key back from ``key_record``'s JSON; ``KilnError`` when it is not one."""
    out = []
    for i, e in enumerate(rec):
        if isinstance(e, list) and len(e) == 2 and e[0] in ("threads", "v") and \
                isinstance(e[1], int if e[0] == "threads" else str) and not isinstance(e[1], bool):
            out.append((e[0], e[1]))
        elif isinstance(e, dict):
            validate(e, {"shape": [(int, str)], "dtype": str, "?values": [(int, float, bool)]}, f"plan key[{i}]")
            t = (tuple(e["shape"]), dtype_named(e["dtype"]))
            out.append(t + (tuple(e["values"]),) if "values" in e else t)
        else:
            raise KilnError(f"the manifest is damaged: plan key[{i}] is {_short(e)}, not an input signature")
    if not out or out[0][0] != "threads":
        raise KilnError("the manifest is damaged: a plan key does not start with its thread count")
    return tuple(out)


def dynamic_record(spec) -> dict | None:
    """A ``kiln.dynamic.DynamicSpec`` as JSON (None for a model without varying dims)."""
    if spec is None:
        return None
    return {"dims": [dataclasses.asdict(d) for d in spec.dims], "hints": dict(spec.hints)}


_DIM = {"position": int, "input": str, "axis": int, "name": str, "min": int, "max": (int, None)}


def dynamic_from(rec):
    """``dynamic_record``'s JSON back as a ``DynamicSpec``; ``KilnError`` when it is damaged."""
    from .dynamic import DynamicSpec, VaryingDim

    if rec is None:
        return None
    validate(rec, {"dims": [_DIM], "hints": Map(int)}, "inputs.dynamic")
    dims = tuple(VaryingDim(**{k: d[k] for k in _DIM}) for d in rec["dims"])
    if not dims or any(d.name not in rec["hints"] or rec["hints"][d.name] < 1 or d.min < 1 or
                       (d.max is not None and d.max < d.min) for d in dims):
        raise KilnError("the manifest is damaged: inputs.dynamic has a dim without a hint or with an empty range")
    return DynamicSpec(dims, dict(rec["hints"]))


def report_record(rep: CompileReport) -> dict:
    return {"fallbacks": [list(f) for f in rep.fallbacks],
            "quantization": [dataclasses.asdict(d) for d in rep.quantization],
            "sparsity": [dataclasses.asdict(d) for d in rep.sparsity],
            "compile_seconds": dict(rep.seconds)}


def decisions(records, module: str, cls_name: str) -> list:
    """Quantization / sparsity decisions as their dataclasses again (shapes as tuples)."""
    if not records:
        return []
    cls = getattr(importlib.import_module(module), cls_name)
    out = []
    for d in records:
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        try:
            out.append(cls(**fixed))
        except TypeError:  # a field this Kiln does not know: keep what the report prints
            pass
    return out


def dumps_tree(spec) -> str | None:
    if spec is None:
        return None
    try:
        return pytree.treespec_dumps(spec)
    except Exception as e:  # noqa: BLE001  (a container type pytree cannot serialize)
        raise KilnError(f"cannot save the model's input/output structure {spec}: {e}") from None


def loads_tree(text, path):
    """A pytree structure; a container type named in it (a Hugging Face ``ModelOutput``, say)
    is imported from its module first when pytree does not know it yet."""
    if text is None:
        return None
    try:
        return pytree.treespec_loads(text)
    except NotImplementedError:
        pass
    for name in _tree_types(json.loads(text)):
        module = name.rpartition(".")[0]
        if module and module != "builtins":
            try:
                importlib.import_module(module)
            except ImportError as e:
                raise KilnError(f"{path}: its outputs are a {name}, and module {module} does not import here ({e})")
    try:
        return pytree.treespec_loads(text)
    except (NotImplementedError, ValueError, TypeError) as e:
        raise KilnError(f"{path}: cannot rebuild the input/output structure ({e})") from None


def _tree_types(doc) -> set[str]:
    out = set()

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                out.add(node["type"])
            for child in node.get("children_spec", ()):
                walk(child)

    walk(doc[1] if isinstance(doc, list) and len(doc) == 2 else doc)
    return out


def unpermute(t: torch.Tensor, perm, name: str, path: str) -> torch.Tensor:
    if sorted(perm) != list(range(t.dim())):
        raise KilnError(f"{path}: weight {name!r} has a damaged layout record")
    inverse = [0] * len(perm)
    for i, p in enumerate(perm):
        inverse[p] = i
    return t.permute(inverse)

