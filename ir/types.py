"""Tensor types: dtype, shape with symbolic dims, memory layout and quantization."""
from __future__ import annotations

import ast
import enum
import functools
import math
import operator
from dataclasses import field
from typing import Union

from .record import record

from .dtypes import DType, QuantSpec


@record(order=True)
class Sym:
    """A symbolic dimension: a named size (``batch``, ``seq``) or an integer expression of
    them (``2*seq``, ``floor(seq/2) + 1``), so one compiled graph serves many sizes.

    ``name`` is the expression's canonical text (sympy's), so equal expressions are equal
    ``Sym``s. Arithmetic with ints and other ``Sym``s gives ``Sym``s (or an int when the
    symbols cancel). A size is never negative, but whether ``seq < 5`` holds is not known
    until run time: comparisons other than equality raise ``TypeError``."""

    name: str

    def __repr__(self) -> str:
        return self.name

    @property
    def symbols(self) -> frozenset:
        """The named sizes this expression depends on."""
        plain = _plain(self.name)
        if plain is not None:
            return plain[1]
        return frozenset(str(s) for s in _expr(self.name).free_symbols)

    def evaluate(self, sizes: dict) -> int:
        """The value of the expression for ``sizes`` (name -> int)."""
        return _evaluator(self.name)(sizes)

    def __add__(self, other): return _dim(_expr_of(self) + _expr_of(other))
    def __radd__(self, other): return _dim(_expr_of(other) + _expr_of(self))
    def __sub__(self, other): return _dim(_expr_of(self) - _expr_of(other))
    def __rsub__(self, other): return _dim(_expr_of(other) - _expr_of(self))
    def __mul__(self, other): return _dim(_expr_of(self) * _expr_of(other))
    def __rmul__(self, other): return _dim(_expr_of(other) * _expr_of(self))
    def __floordiv__(self, other): return _dim(_floor_div(_expr_of(self), _expr_of(other)))
    def __rfloordiv__(self, other): return _dim(_floor_div(_expr_of(other), _expr_of(self)))
    def __neg__(self): return _dim(-_expr_of(self))


Dim = Union[int, Sym]


def is_sym(d) -> bool:
    return isinstance(d, Sym)


def symbolic_dim(text: str) -> Dim:
    """The dim an expression's text denotes, canonical (an int when it is constant)."""
    return _dim(_expr(text))


def has_symbols(x) -> bool:
    """Whether ``x`` (a dim, a tuple of them, or an attribute record) holds a symbolic dim."""
    if isinstance(x, Sym):
        return True
    if isinstance(x, (tuple, list)):
        return any(has_symbols(i) for i in x)
    fields = getattr(x, "__dataclass_fields__", None)
    return bool(fields) and any(has_symbols(getattr(x, f)) for f in fields)


def resolve_symbols(x, sizes: dict):
    """``x`` (as in ``has_symbols``) with every symbolic dim evaluated for ``sizes``."""
    import dataclasses

    if isinstance(x, Sym):
        return x.evaluate(sizes)
    if isinstance(x, tuple):
        return tuple(resolve_symbols(i, sizes) for i in x)
    if isinstance(x, list):
        return [resolve_symbols(i, sizes) for i in x]
    fields = getattr(x, "__dataclass_fields__", None)
    if fields and has_symbols(x):
        return dataclasses.replace(x, **{f: resolve_symbols(getattr(x, f), sizes) for f in fields
                                          if has_symbols(getattr(x, f))})
    return x


def dim_value(d: Dim, sizes: dict) -> int:
    """A dimension's size for ``sizes`` (name -> int): ints as they are."""
    return d if isinstance(d, int) else d.evaluate(sizes)


def _sympy():
    import sympy  # torch's own dependency; imported only where a graph has symbolic dims

    return sympy


@functools.lru_cache(maxsize=1)
def _SYMPY_NAMES() -> dict:
    """Names an expression's text may use: sympy's, and those torch.export writes."""
    sp = _sympy()
    return {"floor": sp.floor, "ceiling": sp.ceiling, "Mod": sp.Mod, "Max": sp.Max, "Min": sp.Min,
            "FloorDiv": lambda a, b: sp.floor(a / b), "CeilDiv": lambda a, b: sp.ceiling(a / b),
            "PythonMod": sp.Mod, "CeilToInt": sp.ceiling, "FloorToInt": sp.floor, "TruncToInt": sp.floor}


@functools.lru_cache(maxsize=4096)
def _expr(text: str):
    """The sympy expression of ``text``, its names as positive integers (sizes)."""
    sp = _sympy()
    e = sp.sympify(text, locals=_SYMPY_NAMES())
    return e.subs({x: sp.Symbol(str(x), integer=True, positive=True) for x in e.free_symbols})


def _expr_of(d):
    if isinstance(d, Sym):
        return _expr(d.name)
    if isinstance(d, int) and not isinstance(d, bool):
        return _sympy().Integer(d)
    return NotImplemented


def _floor_div(a, b):
    return _sympy().floor(a / b)


def _dim(e) -> Dim:
    if e is NotImplemented:
        return NotImplemented
    if not _simplest(e):  # sympy's simplify is costly (its first call imports sympy.physics)
        e = _simplified(e)
    if e.is_Integer:
        return int(e)
    return Sym(str(e))


def _monomial(e) -> bool:
    return e.is_Symbol or (e.is_Mul and all(a.is_Symbol or a.is_Integer for a in e.args))


def _simplest(e) -> bool:
    """Forms ``sympy.simplify`` returns unchanged: an integer, ``k*a*b``, ``k*a*b + c``."""
    if e.is_Integer or _monomial(e):
        return True
    return e.is_Add and len(e.args) == 2 and sum(a.is_Integer for a in e.args) == 1 and any(
        _monomial(a) for a in e.args)


@functools.lru_cache(maxsize=4096)
def _simplified(e):
    """``sympy.simplify``, once per expression (every layer of a model asks for the same ones)."""
    return _sympy().simplify(e)


# What sympy's printer writes for a size expression (and torch.export's names for the same
# functions), as Python on ints: evaluating a symbolic dim then needs no sympy. Importing sympy
# costs a loaded dynamic plan tens of MB of resident memory and a noticeable part of its load
# time; only building new expressions (arithmetic on Syms, at compile time) needs it.
_INT_FUNCS = {"floor": math.floor, "ceiling": math.ceil, "Max": max, "Min": min, "Mod": operator.mod,
              "PythonMod": operator.mod, "FloorDiv": operator.floordiv, "CeilDiv": lambda a, b: -(-a // b),
              "CeilToInt": math.ceil, "FloorToInt": math.floor}


@functools.lru_cache(maxsize=4096)
def _plain(text: str):
    """(code, names) of an expression made only of ints, names, arithmetic and the functions
    of ``_INT_FUNCS``, compiled as Python; None for anything else (sympy evaluates it)."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        return None
    names = set()
    ops = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.USub, ast.UAdd)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _INT_FUNCS) or node.keywords:
                return None
        elif isinstance(node, ast.Name):
            if node.id not in _INT_FUNCS:
                names.add(node.id)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, int):
                return None
        elif not isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, *ops)):
            return None
    tree = ast.fix_missing_locations(_ExactDivision().visit(tree))
    return compile(tree, "<size>", "eval"), frozenset(names)


class _ExactDivision(ast.NodeTransformer):
    """``a / b`` as ``_q(a, b)``, a ``Fraction``: ``floor(2*n/3 + 1/3)`` must not lose an integer
    to float rounding."""

    def visit_BinOp(self, node):
        self.generic_visit(node)
        if isinstance(node.op, ast.Div):
            return ast.Call(ast.Name("_q", ast.Load()), [node.left, node.right], [])
        return node


@functools.lru_cache(maxsize=4096)
def _evaluator(text: str):
    """``f(sizes) -> int`` for an expression, compiled once."""
    plain = _plain(text)
    if plain is not None:
        code, names = plain
        from fractions import Fraction

        scope = {"__builtins__": {}, "_q": Fraction, **_INT_FUNCS}
        return lambda sizes: int(eval(code, scope, {n: sizes[n] for n in names}))
    sp = _sympy()
    e = _expr(text)
    names = sorted(str(s) for s in e.free_symbols)
    syms = sorted(e.free_symbols, key=str)
    fn = sp.lambdify(syms, e, modules=[{"floor": math.floor, "ceiling": math.ceil, "Max": max, "Min": min}, "math"])
    return lambda sizes: int(fn(*(sizes[n] for n in names)))


class LayoutKind(enum.Enum):
    ROW_MAJOR = "row_major"  # contiguous in the logical order (NCHW for 4-D activations)
    CHANNELS_LAST = "channels_last"  # NHWC storage of a logical NCHW tensor
    BLOCKED = "blocked"  # NCHW{c}c: channels split into blocks of `block` innermost
    SPARSE_CSR = "csr"
    SPARSE_BSR = "bsr"
    SPARSE_24 = "2:4"


@record
class Layout:
    """How a tensor's elements lie in memory (row-major, NHWC, blocked)."""
    kind: LayoutKind = LayoutKind.ROW_MAJOR
    block: tuple[int, ...] = ()

    def __repr__(self) -> str:
        if self.kind is LayoutKind.ROW_MAJOR:
            return ""
        short = {LayoutKind.CHANNELS_LAST: "nhwc", LayoutKind.BLOCKED: "nchwc"}.get(self.kind, self.kind.value)
        return f"{short}{list(self.block) if self.block else ''}"


ROW_MAJOR = Layout()


@record
class TensorType:
    """A value's type: dtype, shape (static or symbolic), layout and quantization."""
    dtype: DType
    shape: tuple[Dim, ...]
    layout: Layout = field(default=ROW_MAJOR)
    quant: QuantSpec | None = None

    def __post_init__(self):
        if not isinstance(self.dtype, DType):
            raise TypeError(f"TensorType.dtype must be a DType, got {self.dtype!r}")
        shape = tuple(self.shape)
        for d in shape:
            if isinstance(d, bool) or not isinstance(d, (int, Sym)) or (isinstance(d, int) and d < 0):
                raise TypeError(f"bad dim {d!r} in shape {shape}")
        object.__setattr__(self, "shape", shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            if not isinstance(d, int):
                raise ValueError(f"numel of symbolic shape {self.shape}")
            n *= d
        return n

    @property
    def symbols(self) -> frozenset:
        """The named sizes this type's shape depends on (empty when static)."""
        out: frozenset = frozenset()
        for d in self.shape:
            if isinstance(d, Sym):
                out |= d.symbols
        return out

    def concrete(self, sizes: dict) -> "TensorType":
        """This type with every symbolic dim evaluated for ``sizes``."""
        if self.is_static:
            return self
        return self.with_shape(tuple(dim_value(d, sizes) for d in self.shape))

    def nbytes(self) -> int:
        return int(self.numel() * self.dtype.itemsize + 0.5)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape), self.layout, self.quant)

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape, self.layout, self.quant)

    def __repr__(self) -> str:
        dims = "x".join(str(d) for d in self.shape)
        s = f"{self.dtype.value}[{dims}]"
        if self.layout != ROW_MAJOR:
            s += f"@{self.layout!r}"
        if self.quant is not None:
            s += f"{{{self.quant.scheme.value}}}"
        return s

