"""``kiln.ir.record.record`` against ``@dataclass(frozen=True, ...)``: the same class, both ways.

Each case defines one class body twice — once under ``dataclasses.dataclass`` and once under
``record`` — and checks that construction (positional, keyword, defaults, factories, errors),
``__post_init__``, repr, equality, hashing, ordering, immutability, pickling, copying and the
``dataclasses`` helpers behave the same.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import pickle

import pytest

from kiln.ir.record import record

_ids = itertools.count()


@dataclasses.dataclass(frozen=True, slots=True)
class DPoint:
    x: int
    y: float = 0.5
    tags: tuple = ()


@record
class RPoint:
    x: int
    y: float = 0.5
    tags: tuple = ()


@dataclasses.dataclass(frozen=True, slots=True, order=True)
class DSym:
    name: str


@record(order=True)
class RSym:
    name: str


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class DValue:
    kind: str
    id: int = dataclasses.field(default_factory=lambda: next(_ids))


@record(eq=False)
class RValue:
    kind: str
    id: int = dataclasses.field(default_factory=lambda: next(_ids))


@dataclasses.dataclass(frozen=True)
class DChecked:
    shape: tuple
    note: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self):
        if any(d < 0 for d in self.shape):
            raise ValueError("negative dim")
        object.__setattr__(self, "shape", tuple(self.shape))


@record(slots=False)
class RChecked:
    shape: tuple
    note: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self):
        if any(d < 0 for d in self.shape):
            raise ValueError("negative dim")
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclasses.dataclass(frozen=True, slots=True)
class DEmpty:
    """No fields."""


@record
class REmpty:
    """No fields."""


def _name(obj) -> str:
    return repr(obj)[1:]  # the two classes' names differ only in their first letter


def _both(make):
    return make(DPoint, DSym, DValue, DChecked, DEmpty), make(RPoint, RSym, RValue, RChecked, REmpty)


def _outcome(fn):
    try:
        return ("ok", fn())
    except Exception as e:  # noqa: BLE001  (the type and message are compared)
        return (type(e).__name__, str(e).replace("DPoint", "Point").replace("RPoint", "Point"))


@pytest.mark.parametrize("args, kwargs", [
    ((1,), {}), ((1, 2.0), {}), ((1, 2.0, ("a",)), {}), ((), {"x": 3, "tags": (1,)}),
    ((1,), {"y": 4.0}), ((), {}), ((1, 2, 3, 4), {}), ((1,), {"x": 2}), ((1,), {"z": 2}),
])
def test_construction_matches_dataclass(args, kwargs):
    d = _outcome(lambda: _name(DPoint(*args, **kwargs)))
    r = _outcome(lambda: _name(RPoint(*args, **kwargs)))
    assert d[0] == r[0]
    if d[0] == "ok":
        assert d == r
    else:  # the same complaint about the same argument
        assert d[1].split("() ")[-1] == r[1].split("() ")[-1]


def test_signature_and_match_args():
    assert str(inspect.signature(RPoint)) == str(inspect.signature(DPoint))
    assert RPoint.__match_args__ == DPoint.__match_args__ == ("x", "y", "tags")
    assert RPoint.__slots__ == DPoint.__slots__
    assert not hasattr(RPoint(1), "__dict__")
    assert hasattr(RChecked((1,)), "__dict__")


def test_equality_hash_and_order():
    for P in (DPoint, RPoint):
        assert P(1, 2.0) == P(1, 2.0) and P(1, 2.0) != P(1, 3.0)
        assert hash(P(1, 2.0)) == hash(P(1, 2.0)) == hash((1, 2.0, ()))
        assert P(1) != (1, 0.5, ())  # another class never compares equal
    assert RPoint(1) != DPoint(1)
    for S in (DSym, RSym):
        assert S("a") < S("b") <= S("b") and S("c") > S("b") >= S("b")
        assert sorted([S("b"), S("a")]) == [S("a"), S("b")]
        with pytest.raises(TypeError):
            S("a") < "b"  # noqa: B015
    for V in (DValue, RValue):  # eq=False: identity
        a = V("t")
        assert a == a and a != V("t", a.id) and hash(a) == object.__hash__(a)
    for C in (DChecked, RChecked):  # compare=False fields are left out of eq, hash and repr
        assert C((1,), "a") == C([1], "b") and hash(C((1,), "a")) == hash(C((1,), "b"))
    assert _name(RChecked((2,), "x")) == _name(DChecked((2,), "x")) == "Checked(shape=(2,))"


def test_factories_and_post_init():
    first, second = RValue("t"), RValue("t")
    assert second.id == first.id + 1 and RValue("t", 7).id == 7
    for C in (DChecked, RChecked):
        assert C([1, 2]).shape == (1, 2)
        with pytest.raises(ValueError, match="negative dim"):
            C((-1,))


def test_frozen():
    for obj in (DPoint(1), RPoint(1), RChecked((1,)), RValue("t"), REmpty()):
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.x = 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            del obj.x


@pytest.mark.parametrize("obj", [RPoint(1, 2.0, ("a",)), RSym("s"), RChecked((3, 4), "n"), REmpty()])
def test_pickle_copy_and_helpers(obj):
    for back in (pickle.loads(pickle.dumps(obj)), copy.copy(obj), copy.deepcopy(obj)):
        assert back == obj and type(back) is type(obj)
    assert dataclasses.is_dataclass(obj)
    assert dataclasses.replace(obj) == obj
    assert dataclasses.asdict(obj) == {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    v = RValue("t")
    assert pickle.loads(pickle.dumps(v)).id == v.id


def test_replace_runs_post_init_and_repr_of_empty():
    assert dataclasses.replace(RPoint(1), y=9.0) == RPoint(1, 9.0)
    with pytest.raises(ValueError):
        dataclasses.replace(RChecked((1,)), shape=(-2,))
    assert repr(REmpty()) == "REmpty()" and REmpty() == REmpty()


def test_bad_declarations_are_refused():
    with pytest.raises(TypeError, match="non-default argument 'b' follows default argument"):
        @record
        class Bad:
            a: int = 0
            b: int
    with pytest.raises(ValueError, match=r"record\(order=True\) needs eq=True"):
        record(order=True, eq=False)


@dataclasses.dataclass
class DPlan:
    steps: list
    names: dict = dataclasses.field(default_factory=dict)
    forward: object = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.forward = len(self.steps)


@record(frozen=False, slots=False)
class RPlan:
    steps: list
    names: dict = dataclasses.field(default_factory=dict)
    forward: object = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self.forward = len(self.steps)


@dataclasses.dataclass(eq=False)
class DGraph:
    nodes: tuple = ()


@record(frozen=False, eq=False, slots=False)
class RGraph:
    nodes: tuple = ()


def test_mutable_records_match_dataclass():
    assert str(inspect.signature(RPlan)) == str(inspect.signature(DPlan)) == "(steps: 'list', names: 'dict' = " \
        "<factory>) -> None"
    for P in (DPlan, RPlan):
        a, b = P([1, 2]), P([1, 2])
        assert a == b and a.forward == 2 and a.names == {} and a.names is not b.names
        a.steps.append(3)
        a.names = {"x": 1}
        assert a != b and a.names == {"x": 1}
        assert P.__hash__ is None  # mutable with eq: unhashable, as dataclasses makes it
        back = pickle.loads(pickle.dumps(a))
        assert back == a and back.forward == 2
        with pytest.raises(TypeError):
            P()
    assert _name(RPlan([1], {"k": 2})) == _name(DPlan([1], {"k": 2})) == "Plan(steps=[1], names={'k': 2})"
    for G in (DGraph, RGraph):  # eq=False: identity, hashable
        g = G((1,))
        assert g == g and g != G((1,)) and hash(g) == object.__hash__(g)
        g.nodes = (2,)
        assert g.nodes == (2,)


def test_unsupported_fields_are_refused():
    with pytest.raises(TypeError, match="keyword-only fields are not supported"):
        @record
        class KwOnly:
            a: int = dataclasses.field(default=0, kw_only=True)
    with pytest.raises(TypeError, match="may not have a default"):
        @record(frozen=False, slots=False)
        class Hidden:
            a: int = dataclasses.field(default=0, init=False)
