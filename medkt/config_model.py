"""Everything a user writes, checked by pydantic v2: config dataclasses, components, pipeline
keyword arguments, evaluation-set specs and ``--set`` overrides.

The schema is the Python declaration itself, written once next to the field; a class becomes a
checked config with `config_dataclass` (a pydantic dataclass: direct construction is checked too):

    @config_dataclass
    class Blur:
        sigma: Annotated[float, Range(gt=0)] = 1.0
        loss: Annotated[str, OneOf(loss_names, "finetune loss")] = "infonce"  # run-time choices
        mode: Literal["a", "b"] = "a"

Rules (pydantic strict mode, plus two allowances JSON needs): no quoted numbers (``"500"`` is
refused with a hint), bools are not numbers, an integral float is an integer (``1e3`` -> 1000,
``500.5`` refused), a list is a tuple; keys that are not fields are refused at every level with a
"did you mean". Every problem becomes ONE `ConfigError` line (`config_error`) naming the key path
(MONAI ids, ``#``-separated), the offending value and the expected form, e.g.
``inversion#steps = "abc": expected integer >= 1``; `medkt.bundles.run_bundle` adds the file or
``--set`` override it came from.

Why a wrapper per annotation (`_Expect`) instead of pydantic's own messages: pydantic reports a
union as one error per member and a bad type without the field's range; users get one line
describing the whole field ("null or number > 0"), as before pydantic.

Import light: no torch here.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import os
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Literal, TypeVar, Union

import pydantic
from pydantic import ConfigDict, ValidationError, model_validator
from pydantic_core import ArgsKwargs, PydanticCustomError, core_schema

from medkt.errors import ConfigError, MedktError, did_you_mean

__all__ = ["Range", "OneOf", "config_dataclass", "config_error", "check", "build", "build_components",
           "recheck", "check_call", "config_path", "describe", "fail", "show", "child"]

#: pydantic settings of every medkt config (strict numbers and bools, no NaN / infinity, unknown
#: keys refused; arbitrary classes such as a backend are checked with isinstance)
CONFIG = ConfigDict(strict=True, extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)

# error types a field's one-line description must not hide (they say more than "expected X")
_KEEP = frozenset({"unknown_choice", "unknown_option", "value_error", "missing", "missing_argument",
                   "unexpected_keyword_argument", "extra_forbidden"})


# -- markers used inside Annotated[...] -------------------------------------------------------
@dataclass(frozen=True)
class Range:
    """Numeric bounds: ``Range(0, 1)`` = [0, 1]; ``Range(gt=0)`` = > 0; ``Range(ge=1)`` = >= 1."""

    ge: float | None = None
    le: float | None = None
    gt: float | None = None
    lt: float | None = None

    def ok(self, v: float) -> bool:
        """``v`` satisfies every bound that is set."""
        return ((self.ge is None or v >= self.ge) and (self.le is None or v <= self.le)
                and (self.gt is None or v > self.gt) and (self.lt is None or v < self.lt))

    def describe(self) -> str:
        """The bounds for error messages: ``"in [0, 1]"``, ``"> 0"``, ``">= 1"``; empty when unbounded."""
        lo = f"[{self.ge:g}" if self.ge is not None else (f"({self.gt:g}" if self.gt is not None else None)
        hi = f"{self.le:g}]" if self.le is not None else (f"{self.lt:g})" if self.lt is not None else None)
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f">= {self.ge:g}" if self.ge is not None else f"> {self.gt:g}"
        if hi:
            return f"<= {self.le:g}" if self.le is not None else f"< {self.lt:g}"
        return ""

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def in_range(v: Any) -> Any:
            if v is not None and not self.ok(v):
                raise PydanticCustomError("out_of_range", "expected a value {bounds}", {"bounds": self.describe()})
            return v

        return core_schema.no_info_after_validator_function(in_range, handler(source))


@dataclass(frozen=True)
class OneOf:
    """Choices known only at run time: a registry dict that code can still add to, e.g.
    ``OneOf(_LOSSES, "finetune loss")`` (or a function returning the names)."""

    registry: Iterable[str] | Callable[[], Iterable[str]]
    kind: str = "name"

    def choices(self) -> list[str]:
        """The names registered now (the registry is read at each call)."""
        names = self.registry() if callable(self.registry) else self.registry
        return [str(n) for n in names]

    def describe(self) -> str:
        """For error messages: ``"a known <kind> (name1, name2, ...)"``."""
        return f"a known {self.kind} ({', '.join(sorted(self.choices()))})"

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        def known(v: Any) -> Any:
            names = self.choices()
            if v not in names:
                raise PydanticCustomError("unknown_choice", "unknown {kind}", {"kind": self.kind, "known": names})
            return v

        return core_schema.no_info_after_validator_function(known, handler(source))


# -- describing a type --------------------------------------------------------------------------
_NOUNS = {int: ("integer", "integers"), float: ("number", "numbers"), bool: ("true or false", "booleans"),
          str: ("string", "strings"), dict: ("object", "objects"), list: ("list", "lists"),
          type(None): ("null", "nulls"), Any: ("any value", "values"), os.PathLike: ("path", "paths")}


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _plural(tp: Any) -> str:
    if tp in _NOUNS:
        return _NOUNS[tp][1]
    if dataclasses.is_dataclass(tp):
        return f"{tp.__name__} objects"
    return f"({describe(tp)}) items"


def describe(tp: Any) -> str:
    """A short human description of an annotation: ``list[str] | None`` -> ``null or list of strings``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        extras = [m.describe() for m in args[1:] if isinstance(m, (Range, OneOf))]
        if any(isinstance(m, OneOf) for m in args[1:]):
            return " ".join(e for e in extras if e)
        return " ".join([describe(args[0]), *(e for e in extras if e)])
    if _is_union(tp):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join((["null"] if type(None) in args else []) + parts)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (list, tuple) and args:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {len(args)} {_plural(args[0]) if len(set(args)) == 1 else 'values'}"
        return f"list of {_plural(args[0])}"
    if origin in (dict, Mapping) and args:
        return f"object of {_plural(args[1])}"
    if origin in (list, tuple):
        return "list"
    if origin in (dict, Mapping):
        return "object"
    if dataclasses.is_dataclass(tp):
        return f"object with keys {', '.join(f.name for f in dataclasses.fields(tp) if f.init)}"
    if tp in _NOUNS:
        return _NOUNS[tp][0]
    if isinstance(tp, type):
        return "path" if issubclass(tp, PurePath) else tp.__name__
    return str(tp)


# -- one-line messages --------------------------------------------------------------------------
def child(path: str, key: Any) -> str:
    """``child("inversion", "steps")`` -> ``"inversion#steps"`` (MONAI id syntax)."""
    return f"{path}#{key}" if path else str(key)


def show(value: Any, limit: int = 60) -> str:
    """A value as the user wrote it (JSON), shortened for one-line messages."""
    try:
        text = json.dumps(value, default=str, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fail(path: str, value: Any, expected: str, hint: str = "") -> ConfigError:
    """The one-line error for a bad value: ``KEY = VALUE: expected FORM[. HINT]``."""
    return ConfigError(f"{path or '<config>'} = {show(value)}: expected {expected}{'. ' + hint.strip() if hint else ''}",
                       key=path)


def _quoted_number_hint(value: Any, expected: str) -> str:
    if isinstance(value, str) and ("integer" in expected or "number" in expected):
        try:
            float(value)
        except ValueError:
            return ""
        return f"{show(value)} is a string: write {value.strip()} without quotes"
    return ""


# pydantic's own error types (where no `_Expect` described the field) -> the expected form
_EXPECTED = {"int_type": "integer", "int_from_float": "integer", "float_type": "number", "finite_number": "finite number",
             "bool_type": "true or false", "string_type": "string", "list_type": "list", "tuple_type": "list",
             "dict_type": "object", "dataclass_type": "object", "dataclass_exact_type": "object", "none_required": "null"}


_NO = object()


def _child_of(value: Any, part: Any) -> Any:
    """``value[part]`` (a key, an index or a dataclass field), or `_NO` when ``part`` is not in it."""
    if isinstance(value, ArgsKwargs):
        value = value.kwargs or {}
    if isinstance(value, Mapping):
        return value.get(part, _NO) if part in value else _NO
    if isinstance(value, (list, tuple)) and isinstance(part, int):
        return value[part] if -len(value) <= part < len(value) else _NO
    if dataclasses.is_dataclass(value) and isinstance(part, str):
        return getattr(value, part, _NO)
    return _NO


def _user_loc(value: Any, loc: tuple) -> tuple:
    """The parts of a pydantic error location that are keys / indices in the user's ``value``;
    the others are pydantic's union-member tags (e.g. ``'function-wrap[...]'``), not for users."""
    out = []
    for part in loc:
        nxt = _child_of(value, part)
        if nxt is not _NO:
            out.append(part)
            value = nxt
    return tuple(out)


def _pick(errors: list[dict[str, Any]], value: Any) -> dict[str, Any]:
    """The error to report: the deepest one in the user's data (a bad item says more than "the
    list is wrong"), then the first."""
    return max(errors, key=lambda e: len(_user_loc(value, e["loc"])))


def config_error(exc: ValidationError, value: Any, path: str, what: str | None = None) -> MedktError:
    """ONE `ConfigError` line for a pydantic ``ValidationError`` raised while checking ``value``
    (the user's data) at config path ``path``; ``what`` names the options at the top level
    ("unknown inversion option ..."). A medkt error raised by a validator is returned as is."""
    errors = exc.errors(include_url=False)
    missing = [e for e in errors if e["type"] in ("missing", "missing_argument")]
    err = _pick(errors, value)
    loc = _user_loc(value, err["loc"])
    where = path
    for part in loc:
        where = child(where, part)
    kind, ctx, bad = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "value_error" and isinstance(ctx.get("error"), MedktError):
        inner = ctx["error"]
        if isinstance(inner, ConfigError) and _HERE in str(inner):  # a nested object's own rule
            return ConfigError(str(inner).replace(_HERE, where), key=(inner.key or "").replace(_HERE, where))
        return inner
    if missing and not loc:
        names = [str(e["loc"][-1]) for e in missing]
        return ConfigError(f"{path or what}: missing required {what or 'config'} option(s) {names}", key=path)
    if kind in ("unknown_option", "unexpected_keyword_argument", "extra_forbidden"):
        key = ctx.get("key", err["loc"][-1] if err["loc"] else "?")
        owner = loc if kind == "unknown_option" else loc[:-1]  # pydantic's own errors end with the key
        where = path
        for part in owner:
            where = child(where, part)
        name = (what if not owner else ctx.get("what")) or (where.rsplit("#", 1)[-1] if where else "config")
        known = list(ctx.get("known", []))
        known_text = f" Known: {', '.join(known)}" if known else ""
        return ConfigError(f"unknown {name} option {key!r} ({child(where, key)}).{did_you_mean(str(key), known)}"
                           f"{known_text}", key=child(where, key))
    if kind == "unknown_choice":
        return ConfigError(f"{where} = {show(bad)}: unknown {ctx['kind']}.{did_you_mean(str(bad), ctx['known'])} "
                           f"Known: {', '.join(sorted(ctx['known']))}", key=where)
    if kind == "medkt_expected":
        expected = ctx["expected"]
    elif kind == "literal_error":
        expected = f"one of {ctx.get('expected')}"
    elif kind == "out_of_range":
        expected = f"a value {ctx['bounds']}"
    else:
        expected = _EXPECTED.get(kind, err["msg"][0].lower() + err["msg"][1:])
    hint = _quoted_number_hint(bad, expected)
    if isinstance(bad, str) and ctx.get("choices"):
        hint = did_you_mean(bad, ctx["choices"]).strip()
    return fail(where, bad, expected, hint)


# -- the per-annotation wrapper -----------------------------------------------------------------
class _Expect:
    """Wraps a field's schema: JSON allowances before it (integral float -> int, list -> tuple,
    dict -> nested config), and one "expected <the whole annotation>" error after it when the
    value itself (not an item inside it) is wrong."""

    def __init__(self, tp: Any, base: Any):
        self.tp, self.base = tp, base

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> core_schema.CoreSchema:
        base, tp = self.base, self.tp

        def expect(v: Any, inner: Callable[[Any], Any]) -> Any:
            if base is int and isinstance(v, float) and v.is_integer():
                v = int(v)
            elif typing.get_origin(base) is tuple or base is tuple:
                v = tuple(v) if isinstance(v, list) else v
            elif isinstance(base, type) and issubclass(base, PurePath) and isinstance(v, str):
                v = base(v)
            elif isinstance(base, type) and dataclasses.is_dataclass(base) and isinstance(v, Mapping):
                init = getattr(base, "__medkt_init__", None)  # a config_dataclass: its pydantic __init__
                if init is None:
                    v = base(**v)
                else:  # strict mode takes only instances: build one, checked
                    obj = base.__new__(base)
                    init(obj, **v)
                    v = obj
                _cross_field_rules(v, _HERE)
            try:
                return inner(v)
            except ValidationError as exc:
                errors = exc.errors(include_url=False)
                if any(e["type"] in _KEEP or _user_loc(v, e["loc"]) for e in errors):
                    raise  # an item inside, or a message of its own: keep the precise one
                raise PydanticCustomError("medkt_expected", "expected {expected}",
                                          {"expected": describe(tp), "choices": _literal_values(tp)}) from None

        return core_schema.no_info_wrap_validator_function(expect, handler(source))


#: stands for "this value's config path" in messages of a nested object's ``validate(path)``
#: (pydantic does not tell a validator where it is); `config_error` puts the path in
_HERE = "\x00here\x00"


def _cross_field_rules(obj: Any, path: str) -> None:
    """Run an object's own cross-field rules, ``validate(path)`` (or ``validate()``), if any."""
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(**({"path": path} if "path" in inspect.signature(validate).parameters else {}))


def _literal_values(tp: Any) -> list[str]:
    """The string choices of a ``Literal`` annotation (inside ``Annotated`` / ``| None`` too)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return [a for a in args if isinstance(a, str)]
    if origin is typing.Annotated or _is_union(tp):
        return [v for a in (args[:1] if origin is typing.Annotated else args) for v in _literal_values(a)]
    return []


def _lenient(tp: Any) -> Any:
    """``tp`` with an `_Expect` on it and on every member / item type inside it."""
    if tp is Any or tp is type(None) or isinstance(tp, TypeVar) or typing.get_origin(tp) is typing.ClassVar:
        return tp
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    base, extras = (args[0], args[1:]) if origin is typing.Annotated else (tp, ())
    b_origin, b_args = typing.get_origin(base), typing.get_args(base)
    new = base
    if _is_union(base):
        new = Union[tuple(_lenient(a) for a in b_args)]
    elif b_origin in (list, tuple) and b_args:
        new = b_origin[tuple(a if a is Ellipsis else _lenient(a) for a in b_args)]
    elif b_origin in (dict, Mapping) and len(b_args) == 2:
        new = b_origin[b_args[0], _lenient(b_args[1])]
    if extras:
        new = typing.Annotated[(new, *extras)]
    return typing.Annotated[new, _Expect(tp, base)]


# -- config dataclasses --------------------------------------------------------------------------
# where the object being built sits in the user's config (set by `build` / `check_call`): the
# path and option noun for messages raised inside pydantic (``__init__``, ``__post_init__``)
_WHERE: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar("medkt_config_where", default=None)


@contextlib.contextmanager
def _at(path: str, what: str | None = None) -> Iterator[None]:
    token = _WHERE.set((path, what))
    try:
        yield
    finally:
        _WHERE.reset(token)


def config_path(default: str) -> str:
    """The config path of the object being built (for messages of a ``__post_init__`` check):
    the one `build` / ``from_dict`` was given, else ``default`` (direct construction)."""
    where = _WHERE.get()
    return where[0] if where else default


def _check_keys(cls: type, value: Any, handler: Callable[[Any], Any]) -> Any:
    # before pydantic's own check, so the message can list the known fields with a "did you mean"
    kwargs = value.kwargs if isinstance(value, ArgsKwargs) else value
    if isinstance(kwargs, Mapping):
        known = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in kwargs:
            if key not in known:
                raise PydanticCustomError("unknown_option", "unknown option {key}",
                                          {"key": key, "known": known, "what": getattr(cls, "config_name", None)})
    return handler(value)


T = TypeVar("T")


def config_dataclass(cls: type[T] | None = None, /, **kwargs: Any) -> Any:
    """Class decorator: ``cls`` as a checked config (a pydantic dataclass, `CONFIG` rules, each
    annotation wrapped by `_Expect`); ``kwargs`` go to `dataclasses.dataclass` (e.g. ``frozen``).
    Works on a plain class or on a standard dataclass (a checked subclass is returned then)."""
    if cls is None:
        return functools.partial(config_dataclass, **kwargs)
    if "__dataclass_fields__" in cls.__dict__:  # e.g. a plug-in's @dataclass component: a checked copy
        return _checked_copy(cls)
    try:  # annotations may be strings (PEP 563): resolve them to wrap them
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # a name pydantic may resolve later (forward reference): plain pydantic checks
        hints = {}
    own = cls.__dict__.get("__annotations__", {})
    for name in own:
        if name in hints and typing.get_origin(hints[name]) is not typing.ClassVar:
            own[name] = _lenient(hints[name])
    cls._medkt_keys = model_validator(mode="wrap")(classmethod(_check_keys))  # type: ignore[attr-defined]
    klass = pydantic.dataclasses.dataclass(cls, config=CONFIG, **kwargs)
    checked_init = klass.__init__
    klass.__medkt_init__ = checked_init  # raises pydantic's ValidationError: for nesting (`_Expect`)

    @functools.wraps(checked_init)
    def __init__(self: Any, *args: Any, **kw: Any) -> None:
        names = [f.name for f in dataclasses.fields(klass) if f.init]
        if len(args) > len(names):
            raise TypeError(f"{klass.__name__} takes at most {len(names)} positional arguments, got {len(args)}")
        doubled = sorted(set(names[: len(args)]) & set(kw))
        if doubled:
            raise TypeError(f"{klass.__name__} got multiple values for {doubled}")
        given = {**dict(zip(names, args)), **kw}  # by name: error paths name the field
        try:
            checked_init(self, **given)
        except ValidationError as exc:  # direct construction too: one ConfigError line
            path, what = _WHERE.get() or (getattr(klass, "config_name", None) or klass.__name__, None)
            raise config_error(exc, given, path, what) from None

    klass.__init__ = __init__
    return klass


@functools.lru_cache(maxsize=None)
def _checked_copy(cls: type) -> type:
    """A checked subclass of a standard dataclass (its fields re-declared, defaults kept)."""
    if getattr(cls, "__pydantic_validator__", None) is not None:
        return cls
    hints = typing.get_type_hints(cls, include_extras=True)
    ns: dict[str, Any] = {"__annotations__": {}, "__module__": cls.__module__, "__doc__": cls.__doc__,
                          "__qualname__": cls.__qualname__}
    for f in dataclasses.fields(cls):
        if f.init:
            ns["__annotations__"][f.name] = hints.get(f.name, Any)
            ns[f.name] = dataclasses.field(default=f.default, default_factory=f.default_factory)  # type: ignore[call-overload]
    return config_dataclass(type(cls.__name__, (cls,), ns))


def _construct(cls: type[T], value: Any, path: str, what: str | None) -> T:
    if not isinstance(value, Mapping):
        raise fail(path, value, describe(cls))
    with _at(path, what):
        return cls(**value)


def build(cls: type[T], data: Mapping[str, Any] | None, path: str, what: str | None = None) -> T:
    """``cls(**data)`` checked (one `ConfigError` line naming ``path``), then the object's own
    cross-field rules, ``validate(path)``, if it has them. ``what`` names the options in messages
    (``"unknown inversion option 'stepz'"``; default: the class's ``config_name`` or the last
    part of ``path``). A standard dataclass is checked through a checked subclass."""
    klass = cls if getattr(cls, "__pydantic_validator__", None) is not None else _checked_copy(cls)
    obj = _construct(klass, data or {}, path, what or getattr(cls, "config_name", None)
                     or (path.rsplit("#", 1)[-1] if path else cls.__name__))
    _cross_field_rules(obj, path)
    return obj


def recheck(obj: Any, path: str) -> None:
    """Check a config object again (fields code may have set after construction), by building a
    copy of it: the same checks and messages as construction."""
    _construct(type(obj), {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}, path,
               getattr(obj, "config_name", None) or path.rsplit("#", 1)[-1])


def build_components(specs: Iterable[Any], registry: Any, path: str) -> list[Any]:
    """Components listed as ``[{"name": NAME, **settings}, ...]`` (e.g. inversion priors), each
    built from ``registry`` (a `medkt.registry.Registry` of dataclasses: the fields are the
    settings) and checked like a config. A name may appear once; an unknown name or setting is
    one line with a "did you mean"."""
    out, seen = [], set()
    for i, spec in enumerate(specs or []):
        where = child(path, i)
        if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
            raise fail(where, spec, f'{{"name": {registry.kind} name, ...settings}}')
        name = spec["name"]
        known = registry.names()
        if name not in registry:
            raise ConfigError(f"{child(where, 'name')} = {show(name)}: unknown {registry.kind}.{did_you_mean(name, known)} "
                              f"Known: {', '.join(sorted(known))}", key=child(where, "name"))
        if name in seen:
            raise ConfigError(f"{where}: {registry.kind} {name!r} is listed twice; list it once", key=where)
        seen.add(name)
        settings = {k: v for k, v in spec.items() if k != "name"}
        out.append(build(registry.get(name), settings, where, what=f"{name!r} {registry.kind}"))
    return out


# -- loose values and keyword arguments ------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def _cached_adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(_lenient(tp), config=CONFIG)


def _adapter(tp: Any) -> pydantic.TypeAdapter:
    try:
        hash(tp)
    except TypeError:  # e.g. a Literal of lists: built each time
        return pydantic.TypeAdapter(_lenient(tp), config=CONFIG)
    return _cached_adapter(tp)


def check(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against annotation ``tp`` (the `config_dataclass` rules); returns it
    converted (ints in float fields to float, lists to tuples for tuple fields, dicts to configs)."""
    try:
        return _adapter(tp).validate_python(value)
    except ValidationError as exc:
        raise config_error(exc, value, path) from None


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # an unresolvable forward reference: names are checked, values trusted
        return {}


def _accepted_params(target: Any) -> dict[str, Any]:
    """Named parameters -> annotation (Any if none) a call of ``target`` accepts; for a class, the
    union over its ``__init__`` chain while each passes ``**kwargs`` on to its parent."""
    funcs = []
    if isinstance(target, type):
        for klass in target.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is object:
                continue
            funcs.append(init)
            if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
                break
    else:
        funcs.append(target)
    params: dict[str, Any] = {}
    for fn in funcs:
        hints = _hints(fn)
        for name, p in inspect.signature(fn).parameters.items():
            if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name not in params:
                params[name] = hints.get(name, Any)
    return params


@functools.lru_cache(maxsize=128)
def _arguments_model(target: Any, skip: tuple[str, ...]) -> type:
    """A config dataclass of the keyword arguments of ``target`` (every one optional: only the
    values given are checked; missing ones are the call's business)."""
    params = {k: v for k, v in _accepted_params(target).items() if k not in skip}
    ns = {"__annotations__": params, **{k: None for k in params}}
    return config_dataclass(type(f"{getattr(target, '__name__', 'call')}Arguments", (), ns))


def check_call(target: Any, kwargs: Mapping[str, Any], path: str, what: str | None = None,
               skip: Iterable[str] = ()) -> dict[str, Any]:
    """Check keyword arguments for ``target`` (a function, or a class: its ``__init__`` chain)
    against its annotations: unknown names and bad values are one `ConfigError` line. ``skip``:
    parameters the caller fills itself (not user options). Returns the checked values."""
    what = what or (path.rsplit("#", 1)[-1] if path else getattr(target, "__name__", "option"))
    if not isinstance(kwargs, Mapping):
        raise fail(path, kwargs, "object of options")
    model = _arguments_model(target, tuple(skip))
    obj = _construct(model, kwargs, path, what)
    return {k: getattr(obj, k) for k in kwargs}
