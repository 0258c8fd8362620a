"""Request batching over a loaded artifact, without Ray: what ``kiln.serving`` and
``kiln.ray`` run inside each replica or actor.

An artifact holds one plan per input signature it was called with; a static plan takes
one batch size. A batch of requests is run like this:

* requests are grouped by their non-batch shape and dtype (a BERT request of 128 tokens is
  never stacked with one of 64); each group runs on the plans saved for that shape;
* a group's rows (dim 0 of every input; a request may carry several) are concatenated and
  cut into chunks of the saved batch sizes, largest first; the last chunk is padded (its
  last row repeated) up to the smallest saved batch size that holds it, and the padded
  rows' outputs are dropped;
* a plan whose dims are names (a ``dynamic=`` model's symbolic dims, in artifacts that
  record them) takes any size there: a symbolic batch dim runs the whole group in one
  call, nothing cut or padded;
* each output tensor is cut back along dim 0, so every request gets exactly its rows.

This assumes dim 0 is the batch dim and that rows do not influence each other (true of
inference-mode CNNs, RNNs and Transformers; not of a model that reduces over the batch).
A model whose output is not batch-major fails that group with a message rather than
answering with another request's rows.
"""
from __future__ import annotations

import io
import json

import numpy as np
import torch
import torch.utils._pytree as pytree

from .errors import KilnError
from kiln.ir.record import record


class BadRequest(KilnError):
    """A request body that cannot be run (answered with HTTP 400 and this message)."""


@record(slots=False)
class Signature:
    """One saved plan's inputs: batch size, and (non-batch shape, dtype) per input. A dim
    that is a name (a ``dynamic=`` artifact's symbolic dim) takes any size: ``batch=None``
    is a plan that runs every batch size, so its rows are never cut or padded."""

    batch: int | None
    rest: tuple  # ((shape[1:] with ints or dim names, numpy dtype str), ...)


def signatures(model) -> list[Signature]:
    """The plans a loaded model holds, as batchable signatures. KilnError when the model is
    not called with positional tensors of rank >= 1 (nothing to batch along)."""
    state = model.state()
    out = []
    for key, _ in state.plans:
        rest, batch = [], None
        for entry in key[1:]:  # key[0] is the thread count
            if len(entry) != 2 or not isinstance(entry[0], tuple) or not isinstance(entry[1], torch.dtype):
                raise KilnError(f"{state.name} takes a non-tensor input ({entry!r}): serving needs a model "
                                f"called with positional tensors only")
            shape, dtype = entry
            if not shape:
                raise KilnError(f"{state.name} takes a scalar tensor input: serving batches along dim 0")
            if not rest:
                batch = shape[0]
            elif shape[0] != batch:
                raise KilnError(f"{state.name}'s inputs disagree on dim 0 ({batch} vs {shape[0]}): serving "
                                f"batches along dim 0 of every input")
            rest.append((tuple(shape[1:]), str(torch.empty((), dtype=dtype).numpy().dtype)))
        if not rest:
            raise KilnError(f"{state.name} takes no tensor inputs: nothing to serve")
        out.append(Signature(batch if isinstance(batch, int) else None, tuple(rest)))
    if state.tensor_args is None or state.tensor_args != len(out[0].rest):
        raise KilnError(f"{state.name} was compiled with keyword or nested inputs: serving calls the model "
                        f"with positional tensors only")
    return out


class Batcher:
    """Runs lists of requests (each a tuple of numpy arrays, one per input) on a loaded model."""

    def __init__(self, model, sigs: list[Signature] | None = None):
        """``model``: a loaded artifact (its plans are the signatures), or any callable with
        ``sigs`` given (the benchmarks run eager PyTorch this way)."""
        self.model = model
        self.sigs = sigs if sigs is not None else signatures(model)
        self.by_rest: dict[tuple, list[int]] = {}  # static batch sizes per non-batch pattern
        self.any_batch: set[tuple] = set()  # patterns with a plan for every batch size
        # exact (static) patterns are tried before ones with named dims
        for s in sorted(self.sigs, key=lambda s: any(isinstance(d, str) for shp, _ in s.rest for d in shp)):
            sizes = self.by_rest.setdefault(s.rest, [])
            if s.batch is None:
                self.any_batch.add(s.rest)
            else:
                sizes.append(s.batch)
        for sizes in self.by_rest.values():
            sizes.sort()
        self.n_inputs = len(self.sigs[0].rest)

    # -- checking requests --------------------------------------------------------------
    def describe(self) -> str:
        """The saved signatures, e.g. ``(float32[B, 3, 32, 32]) with B in [1, 8]``."""
        parts = []
        for rest, sizes in self.by_rest.items():
            ins = ", ".join(f"{dt}[B{''.join(f', {d}' for d in s)}]" for s, dt in rest)
            parts.append(f"({ins}) with " + ("any B" if rest in self.any_batch else f"B in {sizes}"))
        return "; ".join(parts)

    def pattern(self, arrays) -> tuple | None:
        """The saved non-batch pattern ``arrays`` (one per input) match, or None. A named
        dim matches any size, the same size wherever the name appears."""
        for rest in self.by_rest:
            sizes: dict[str, int] = {}
            ok = len(rest) == len(arrays)
            for a, (shape, _) in zip(arrays, rest):
                if not ok or a.ndim != len(shape) + 1:
                    ok = False
                    break
                for want, got in zip(shape, a.shape[1:]):
                    if isinstance(want, str):
                        ok = ok and sizes.setdefault(want, got) == got
                    else:
                        ok = ok and want == got
            if ok:
                return rest
        return None

    def check(self, arrays) -> tuple:
        """``arrays`` as the model's inputs, or BadRequest. Dtypes are cast within a kind and
        upwards (float64 to float32: JSON numbers are doubles; ints to floats); a float
        for an integer input is refused, as is anything not numeric."""
        if len(arrays) != self.n_inputs:
            raise BadRequest(f"the model takes {self.n_inputs} input(s), the request has {len(arrays)}")
        out = []
        for i, a in enumerate(arrays):
            a = np.asarray(a)
            if a.dtype == object or a.dtype.kind not in "biuf":
                raise BadRequest(f"input {i}: expected a numeric array, got dtype {a.dtype} (ragged nested lists?)")
            out.append(a)
        rows = {a.shape[0] if a.ndim else None for a in out}
        rest = self.pattern(out)
        if rest is not None:
            if len(rows) != 1 or 0 in rows:
                raise BadRequest(f"every input needs the same number of rows (dim 0, at least 1), got "
                                 f"{[a.shape[0] for a in out]}")
            cast = []
            for i, (a, (_, dt)) in enumerate(zip(out, rest)):
                want = np.dtype(dt)
                allowed = np.can_cast(a.dtype, want, casting="same_kind") and not (
                    a.dtype.kind == "f" and want.kind in "iub")
                if a.dtype != want and not allowed:
                    raise BadRequest(f"input {i}: expected dtype {want}, got {a.dtype}")
                cast.append(np.ascontiguousarray(a, dtype=want))
            return tuple(cast)
        raise BadRequest(f"input shapes {[list(a.shape) for a in out]} match no saved plan; this artifact "
                         f"serves {self.describe()}")

    # -- running ------------------------------------------------------------------------
    def run(self, requests: list) -> list:
        """One result per request: a list of numpy output arrays, or the exception for
        that request's group."""
        results: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(tuple((a.shape[1:], a.dtype.str) for a in req), []).append(i)
        for idx in groups.values():
            try:
                outs = self._run_group([requests[i] for i in idx])
            except Exception as e:  # noqa: BLE001  (every request of the group gets the error)
                outs = [e] * len(idx)
            for i, o in zip(idx, outs):
                results[i] = o
        return results

    def _run_group(self, reqs: list) -> list:
        rest = self.pattern(reqs[0])
        sizes = self.by_rest[rest]
        rows = [r[0].shape[0] for r in reqs]
        stacked = [np.concatenate([r[k] for r in reqs]) if len(reqs) > 1 else reqs[0][k]
                   for k in range(self.n_inputs)]
        total, start, chunks = sum(rows), 0, []
        if rest in self.any_batch:  # one plan runs every batch size: one call, nothing padded
            chunks.append(self._run_chunk(stacked, total, total))
            start = total
        while start < total:
            left = total - start
            fits = [b for b in sizes if b <= left]
            b = fits[-1] if fits else sizes[0]
            take = min(b, left)
            chunks.append(self._run_chunk([x[start:start + take] for x in stacked], b, take))
            start += take
        leaves = [np.concatenate([c[j] for c in chunks]) if len(chunks) > 1 else chunks[0][j]
                  for j in range(len(chunks[0]))]
        out, at = [], 0
        for n in rows:
            out.append([x[at:at + n] for x in leaves])
            at += n
        return out

    def _run_chunk(self, inputs: list, batch: int, rows: int) -> list:
        if rows < batch:  # the last row repeated up to the saved batch size (a valid input, unlike
            # zeros for a model with masks or indices); those rows' outputs are dropped
            inputs = [np.concatenate([x, np.repeat(x[-1:], batch - rows, axis=0)]) for x in inputs]
        with torch.inference_mode():
            result = self.model(*[torch.from_numpy(x) for x in inputs])
        leaves = [x for x in pytree.tree_leaves(result) if isinstance(x, torch.Tensor)]
        out = []
        for j, t in enumerate(leaves):
            if t.dim() == 0 or t.shape[0] != batch:
                raise KilnError(f"output {j} has shape {list(t.shape)}, not batch-major (dim 0 = {batch}): "
                                f"this model's answers cannot be split per request")
            out.append(t[:rows].detach().cpu().numpy())
        return out


# -- request and response bodies ----------------------------------------------------------
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"


def parse_body(body: bytes, n_inputs: int) -> tuple[list, str]:
    """The arrays in an HTTP body and its format ("json", "npy" or "npz"), or BadRequest.

    JSON: ``{"inputs": [x0, x1, ...]}`` (nested lists, one per model input); for a one-input
    model ``{"inputs": x}`` or the bare nested list ``x``. Every input keeps its batch dim
    (one row: ``[[...]]``). ``.npy``: one array (a one-input
    model). ``.npz``: arrays ``arr_0``, ``arr_1``, ... in input order."""
    if body.startswith(NPY_MAGIC):
        if n_inputs != 1:
            raise BadRequest(f"a .npy body holds one array; this model takes {n_inputs} inputs (send .npz or JSON)")
        try:
            return [np.load(io.BytesIO(body), allow_pickle=False)], "npy"
        except Exception as e:  # noqa: BLE001  (numpy raises several types for a damaged file)
            raise BadRequest(f"the .npy body cannot be read ({type(e).__name__}: {e})") from None
    if body.startswith(ZIP_MAGIC):
        try:
            with np.load(io.BytesIO(body), allow_pickle=False) as z:
                names = sorted(z.files, key=lambda s: int(s[4:]) if s.startswith("arr_") and s[4:].isdigit() else -1)
                return [z[n] for n in names], "npz"
        except Exception as e:  # noqa: BLE001
            raise BadRequest(f"the .npz body cannot be read ({type(e).__name__}: {e})") from None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is neither JSON nor .npy/.npz ({e})") from None
    if isinstance(data, dict):
        if "inputs" not in data:
            raise BadRequest('a JSON body is {"inputs": [...]} (or a bare nested list for a one-input model)')
        data = data["inputs"]
    if n_inputs == 1:
        return [_array(data, 0)], "json"
    if not isinstance(data, list) or len(data) != n_inputs:
        raise BadRequest(f"this model takes {n_inputs} inputs: send {{\"inputs\": [x0, ..., x{n_inputs - 1}]}}")
    return [_array(x, i) for i, x in enumerate(data)], "json"


def _array(x, i: int) -> np.ndarray:
    try:
        a = np.asarray(x)
    except ValueError as e:
        raise BadRequest(f"input {i}: not a rectangular nested list ({e})") from None
    if a.dtype == np.float64:
        a = a.astype(np.float32)  # JSON numbers are doubles; float32 models take them
    return a


def json_response(outputs: list) -> dict:
    return {"output": outputs[0].tolist()} if len(outputs) == 1 else {"outputs": [o.tolist() for o in outputs]}


def array_response(outputs: list, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy" and len(outputs) == 1:
        np.save(buf, outputs[0], allow_pickle=False)
    else:
        np.savez(buf, *outputs)
    return buf.getvalue()
