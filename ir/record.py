"""Records: ``@record`` is ``@dataclass(frozen=True, slots=True)`` built without compiling code.

Kiln's data types are dataclasses — about a hundred: every op's attributes, tensor types,
values and nodes, plan steps, reports — and a process that loads an artifact or
compiles a model imports most of them. ``dataclasses`` writes each class's ``__init__``,
``__repr__``, ``__eq__``, ``__hash__`` (and a frozen class's ``__setattr__`` and
``__delattr__``) as Python source and compiles it, one ``exec`` per method; on Python 3.11
that compiling was most of the time a process spent importing what ``kiln.load`` needs
(``python -m kiln.bench.imports`` compares both builds), paid again in every process that
starts: each worker of a server, each ``kiln run``.

``record`` lets ``dataclasses`` do what costs little — collect the fields, build the
slotted class, set ``__match_args__`` — and adds the methods without compiling anything:

* ``__init__`` is a template (``def __init__(self, f0, f1): set(self, 'f0', f0); ...``)
  compiled once per shape (field count, which fields have a ``default_factory``, whether
  ``__post_init__`` is called), whose code object is given the class's field names
  (``CodeType.replace``), so it has the dataclass's exact signature: positional or keyword
  arguments, defaults, factories (called when the argument is left out), ``__post_init__``;
* ``__repr__``, ``__eq__``, ``__hash__``, ordering, a frozen class's ``__setattr__`` and
  ``__delattr__``, and its pickling (``__getstate__``/``__setstate__``, as ``dataclasses``
  gives slotted frozen classes) are shared functions over the fields' values.

The result is a dataclass to every tool (``dataclasses.fields``, ``replace``, ``asdict``,
``is_dataclass``) and behaves as ``@dataclass(...)`` with the same arguments would, which
``tests/ir/test_record.py`` checks side by side. Not supported (refused when declared):
keyword-only fields, and defaults on fields left out of ``__init__``. One difference: its
``__dataclass_params__`` describes what ``dataclasses`` itself generated (no init, repr or
eq; not frozen), so a dataclass may not inherit from a record (none does).
"""
from __future__ import annotations

import dataclasses
import operator
import types

__all__ = ["record"]

_set = object.__setattr__
_MISSING = dataclasses.MISSING


class _Factory:
    """The default of an argument whose field has a ``default_factory``."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "<factory>"


_FACTORY = _Factory()
_templates: dict[tuple[int, tuple[int, ...], bool], types.CodeType] = {}


def _template(n: int, factories: tuple[int, ...], post_init: bool) -> types.CodeType:
    """``__init__``'s code for ``n`` fields named f0..f{n-1}: compiled once per shape."""
    key = (n, factories, post_init)
    code = _templates.get(key)
    if code is None:
        lines = [f"def __init__(self{''.join(f', f{i}' for i in range(n))}):"]
        for i in range(n):
            if i in factories:
                lines.append(f"    if f{i} is _FACTORY: f{i} = _factory{i}()")
            lines.append(f"    _set(self, 'f{i}', f{i})")
        if post_init:
            lines.append("    self.__post_init__()")
        lines.append("    return None")
        scope: dict = {}
        exec("\n".join(lines), {}, scope)
        code = _templates[key] = scope["__init__"].__code__
    return code


def _make_init(cls, fields: tuple) -> types.FunctionType:
    for f in fields:
        if f.kw_only:
            raise TypeError(f"{cls.__qualname__}.{f.name}: keyword-only fields are not supported by record")
        if not f.init and (f.default is not _MISSING or f.default_factory is not _MISSING):
            raise TypeError(f"{cls.__qualname__}.{f.name}: a field left out of __init__ may not have a default "
                            f"in a record (set it in __post_init__)")
    fields = tuple(f for f in fields if f.init)
    names = tuple(f.name for f in fields)
    if "self" in names:
        raise TypeError(f"{cls.__qualname__}: a record's field may not be named 'self'")
    defaults, factories, env = [], [], {"_set": _set, "_FACTORY": _FACTORY}
    for i, f in enumerate(fields):
        if f.default is not _MISSING:
            defaults.append(f.default)
        elif f.default_factory is not _MISSING:
            defaults.append(_FACTORY)
            factories.append(i)
            env[f"_factory{i}"] = f.default_factory
        elif defaults:
            raise TypeError(f"{cls.__qualname__}: non-default argument {f.name!r} follows default argument")
    code = _template(len(names), tuple(factories), hasattr(cls, "__post_init__"))
    rename = {f"f{i}": n for i, n in enumerate(names)}
    qualname = f"{cls.__qualname__}.__init__"
    code = code.replace(co_varnames=("self", *names), co_qualname=qualname,
                        co_consts=tuple(rename.get(c, c) if type(c) is str else c for c in code.co_consts))
    init = types.FunctionType(code, env, "__init__", tuple(defaults) or None)
    init.__qualname__ = qualname
    init.__module__ = cls.__module__
    init.__annotations__ = {**{f.name: f.type for f in fields}, "return": None}
    return init


def _values_getter(names: tuple):
    """A function from a record to the tuple of its fields' values."""
    if not names:
        return lambda self: ()
    if len(names) == 1:
        get = operator.attrgetter(names[0])
        return lambda self: (get(self),)
    return operator.attrgetter(*names)


def _frozen_setattr(self, name, value):
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")


def _frozen_delattr(self, name):
    raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")


def _install(cls, name: str, fn) -> None:
    fn.__qualname__ = f"{cls.__qualname__}.{name}"
    setattr(cls, name, fn)


def _add_methods(cls, eq: bool, order: bool, frozen: bool, slots: bool):
    fields = dataclasses.fields(cls)
    names = tuple(f.name for f in fields)
    values = _values_getter(names)
    own = cls.__dict__
    if "__init__" not in own:
        setattr(cls, "__init__", _make_init(cls, fields))
    if "__repr__" not in own:
        shown = tuple(f.name for f in fields if f.repr)

        def __repr__(self):
            return f"{type(self).__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in shown)})"
        _install(cls, "__repr__", __repr__)
    if eq:
        compared = tuple(f.name for f in fields if f.compare)
        key = _values_getter(compared)
        if "__eq__" not in own:
            def __eq__(self, other):
                if other.__class__ is self.__class__:
                    return key(self) == key(other)
                return NotImplemented
            _install(cls, "__eq__", __eq__)
        if own.get("__hash__") is None and not frozen:  # as dataclasses does: mutable, so unhashable
            cls.__hash__ = None
        elif own.get("__hash__") is None:  # not defined in the class (or set to None by its __eq__)
            hashed = _values_getter(tuple(f.name for f in fields if (f.compare if f.hash is None else f.hash)))

            def __hash__(self):
                return hash(hashed(self))
            _install(cls, "__hash__", __hash__)
    if order:
        for name, op in (("__lt__", operator.lt), ("__le__", operator.le),
                         ("__gt__", operator.gt), ("__ge__", operator.ge)):
            if name in own:
                raise TypeError(f"{cls.__qualname__} defines {name}: a record with order=True writes its own")
            _install(cls, name, _comparison(op, key))
    if not frozen:
        return cls
    _install(cls, "__setattr__", _frozen_setattr)
    _install(cls, "__delattr__", _frozen_delattr)
    if slots:
        def __getstate__(self):
            return list(values(self))

        def __setstate__(self, state):
            for n, v in zip(names, state):
                _set(self, n, v)
        _install(cls, "__getstate__", __getstate__)
        _install(cls, "__setstate__", __setstate__)
    return cls


def _shown(f) -> str:
    text = f"{f.name}: {f.type if isinstance(f.type, str) else getattr(f.type, '__name__', f.type)}"
    if f.default is not _MISSING:
        return f"{text} = {f.default!r}"
    return text if f.default_factory is _MISSING else f"{text} = <factory>"


def _comparison(op, key):
    def compare(self, other):
        if other.__class__ is self.__class__:
            return op(key(self), key(other))
        return NotImplemented
    return compare


def record(cls=None, /, *, eq: bool = True, order: bool = False, frozen: bool = True, slots: bool = True):
    """``@dataclass(frozen=frozen, slots=slots, eq=eq, order=order)``, built without compiling
    code (see the module's docstring). ``order`` needs ``eq``; fields may not be keyword-only,
    and a field left out of ``__init__`` (``field(init=False)``) may not have a default."""
    if order and not eq:
        raise ValueError("record(order=True) needs eq=True")

    def wrap(c):
        documented = c.__doc__ is not None
        made = dataclasses.dataclass(c, init=False, repr=False, eq=False, slots=slots)
        made = _add_methods(made, eq, order, frozen, slots)
        if not documented:  # as dataclasses does: the class's signature (its __init__ is new now)
            made.__doc__ = f"{made.__name__}({', '.join(_shown(f) for f in dataclasses.fields(made))})"
        return made

    return wrap if cls is None else wrap(cls)
