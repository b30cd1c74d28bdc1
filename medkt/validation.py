"""One validation layer for everything a user writes: config dataclasses, pipeline keyword
arguments, evaluation-set specs and ``--set`` overrides.

The schema is the Python declaration itself, so it is written once, next to the field:

* types come from the annotations (``int``, ``float``, ``bool``, ``str``, ``X | None``,
  ``tuple[float, float]``, ``list[str]``, ``dict[str, X]``, ``Literal["a", "b"]``, nested
  dataclasses);
* ranges and run-time choices ride along with `typing.Annotated`:

      steps: Annotated[int, Range(ge=1)] = 5000
      p: Annotated[float, Range(0, 1)] = 0.5  # e.g. the affine augmentation's probability
      objective: Annotated[str, OneOf(_OBJECTIVES, "inversion objective")] = "cosine"

* keys that are not fields are errors at every nesting level, with a "did you mean" hint.

Every problem is one `ConfigError` line naming the key path (MONAI ids,
``#``-separated), the offending value and the expected form, e.g.
``inversion#steps = "abc": expected integer >= 1``; `medkt.bundles.run_bundle` adds the
file or ``--set`` override it came from.

Strictness: JSON config files must hold JSON numbers (``{"steps": "500"}`` is refused: a quoted
number is usually a mistake elsewhere too). ``--set`` values are parsed as JSON first, so
``--set inversion#steps=500`` is the number 500 and ``--set inversion#steps=abc`` the string
``"abc"`` (refused). Integral floats (``1e3``) are accepted where an integer is expected.

Import light: no torch here.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Union

from medkt.errors import ConfigError, did_you_mean

__all__ = ["Range", "OneOf", "check", "check_fields", "build", "check_instance", "check_call",
           "check_pipeline_args", "build_components", "describe", "fail", "show", "child", "EvaluationSpec", "ClassPrompts"]


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
        base = describe(args[0])
        extras = [m.describe() for m in args[1:] if isinstance(m, (Range, OneOf))]
        if any(isinstance(m, OneOf) for m in args[1:]):
            return " ".join(e for e in extras if e)
        return " ".join([base, *(e for e in extras if e)])
    if _is_union(tp):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join((["null"] if type(None) in args else []) + parts)
    if origin is Literal:
        return "one of " + ", ".join(json.dumps(a) for a in args)
    if origin in (list, tuple) and args:
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"list of {len(args)} {_plural(args[0]) if len(set(args)) == 1 else 'values'}"
        return f"list of {_plural(args[0])}"
    if origin is dict and args:
        return f"object of {_plural(args[1])}"
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "object"
    if dataclasses.is_dataclass(tp):
        return f"object with keys {', '.join(f.name for f in dataclasses.fields(tp) if f.init)}"
    if tp in _NOUNS:
        return _NOUNS[tp][0]
    if isinstance(tp, type):
        return tp.__name__
    return str(tp)


# -- checking a value ---------------------------------------------------------------------------
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


def _quoted_number_hint(value: Any) -> str:
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return "Write numbers without quotes in JSON configs"
    return ""


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "dict"
    if isinstance(value, (list, tuple)):
        return "list"
    return "scalar"


def _kind_of_type(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _kind_of_type(typing.get_args(tp)[0])
    if origin in (dict, Mapping) or tp in (dict,) or dataclasses.is_dataclass(tp):
        return "dict"
    if origin in (list, tuple) or tp in (list, tuple):
        return "list"
    return "scalar"


def check(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against annotation ``tp``; returns it converted (ints in float fields to
    float, lists to tuples for tuple fields, nested dataclass objects to checked dicts)."""
    if tp is Any or tp is object:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        try:
            out = check(value, args[0], path)
        except ConfigError as exc:
            if exc.key != path:  # a nested item: its own message is the precise one
                raise
            raise fail(path, value, describe(tp), _quoted_number_hint(value)) from None
        if out is None:
            return out
        for marker in args[1:]:
            if isinstance(marker, Range) and not marker.ok(out):
                raise fail(path, value, describe(tp))
            if isinstance(marker, OneOf):
                known = marker.choices()
                if out not in known:
                    raise ConfigError(f"{path} = {show(value)}: unknown {marker.kind}.{did_you_mean(str(out), known)} "
                                      f"Known: {', '.join(sorted(known))}", key=path)
        return out
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        alts = [a for a in args if a is not type(None)]
        if len(alts) == 1:
            try:
                return check(value, alts[0], path)
            except ConfigError as exc:
                if exc.key != path or ": expected " not in str(exc) or type(None) not in args:
                    raise
                raise fail(path, value, describe(tp), _quoted_number_hint(value)) from None
        errors = []
        for a in alts:
            try:
                return check(value, a, path)
            except ConfigError as exc:
                errors.append((a, exc))
        same_shape = [e for a, e in errors if _kind_of_type(a) == _kind(value) and _kind(value) != "scalar"]
        if len(same_shape) == 1:  # e.g. the right container with a bad item: report the item
            raise same_shape[0]
        raise fail(path, value, describe(tp))
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        hint = did_you_mean(str(value), [str(a) for a in args]) if isinstance(value, str) else ""
        raise fail(path, value, describe(tp), hint)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail(path, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail(path, value, "integer", _quoted_number_hint(value))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise fail(path, value, "finite number")
            return float(value)
        raise fail(path, value, "number", _quoted_number_hint(value))
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail(path, value, "string")
    if tp is type(None):
        if value is None:
            return None
        raise fail(path, value, "null")
    if tp in (os.PathLike,) or (isinstance(tp, type) and issubclass(tp, os.PathLike)):
        if isinstance(value, (str, os.PathLike)):
            return value
        raise fail(path, value, "path (string)")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail(path, value, describe(tp))
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise fail(path, value, describe(tp))
            return tuple(check(v, a, child(path, i)) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [check(v, item, child(path, i)) for i, v in enumerate(value)]
        return tuple(out) if (origin or tp) is tuple else out
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise fail(path, value, describe(tp))
        kt, vt = (args + (Any, Any))[:2] if args else (Any, Any)
        return {check(k, kt, path): check(v, vt, child(path, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            check_instance(value, path)
            return value
        if not isinstance(value, Mapping):
            raise fail(path, value, describe(tp))
        fields = check_fields(tp, value, path)
        _validate(tp(**fields), path)
        return fields
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise fail(path, value, describe(tp))
    return value  # an annotation this layer does not understand (e.g. a TypeVar): trust it


# -- dataclasses --------------------------------------------------------------------------------
def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj, include_extras=True)
    except Exception:  # unresolvable forward reference: check names only
        return {}


def check_fields(cls: type, data: Mapping[str, Any] | None, path: str, what: str | None = None) -> dict[str, Any]:
    """The fields of dataclass ``cls`` given as a dict, checked and converted (not instantiated).

    ``what`` names the options in messages (``"unknown inversion option 'stepz' ..."``; default:
    the last part of ``path``)."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise fail(path, data, describe(cls))
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    what = what or getattr(cls, "config_name", None) or (path.rsplit("#", 1)[-1] if path else cls.__name__)
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown {what} option {key!r} ({child(path, key)}).{did_you_mean(str(key), list(fields))} "
                              f"Known: {', '.join(fields)}", key=child(path, key))
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{path or cls.__name__}: missing required {what} option(s) {missing}", key=path)
    hints = _hints(cls)
    return {k: check(v, hints.get(k, Any), child(path, k)) for k, v in data.items()}


def check_instance(obj: Any, path: str) -> None:
    """Check every field of a dataclass instance against its annotation (e.g. after code set one)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in hints:
            check(getattr(obj, f.name), hints[f.name], child(path, f.name))


T = typing.TypeVar("T")


def build(cls: type[T], data: Mapping[str, Any] | None, path: str, what: str | None = None) -> T:
    """``cls(**checked fields)``, then ``validate(path)`` if the class has one (cross-field rules)."""
    obj = cls(**check_fields(cls, data, path, what))
    _validate(obj, path)
    return obj


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


def _validate(obj: Any, path: str) -> None:
    """Run a dataclass's own cross-field rules (``validate(path=...)``), if it has any."""
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    if "path" in inspect.signature(validate).parameters:
        validate(path=path)
    else:
        validate()


# -- keyword arguments of a callable (pipeline classes, post-processing functions) --------------
def _accepted_params(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    """Named parameters (and their resolved annotations) a call of ``target`` accepts; for a class,
    the union over its ``__init__`` chain while each passes ``**kwargs`` on to its parent."""
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
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
    for fn in funcs:
        fn_hints = _hints(fn)
        for name, p in inspect.signature(fn).parameters.items():
            if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in params:
                continue
            params[name] = p
            if name in fn_hints:
                hints[name] = fn_hints[name]
    return params, hints


def check_call(target: Any, kwargs: Mapping[str, Any], path: str, what: str | None = None,
               skip: Iterable[str] = ()) -> dict[str, Any]:
    """Check keyword arguments for ``target`` (a function or a class, see `_accepted_params`):
    unknown names and values that do not match the annotations are `ConfigError`.
    ``skip``: parameters the caller fills itself (not user options). Returns the checked values."""
    params, hints = _accepted_params(target)
    for name in skip:
        params.pop(name, None)
    what = what or (path.rsplit("#", 1)[-1] if path else getattr(target, "__name__", "option"))
    if not isinstance(kwargs, Mapping):
        raise fail(path, kwargs, "object of options")
    out = {}
    for key, value in kwargs.items():
        if key not in params:
            raise ConfigError(f"unknown {what} option {key!r} ({child(path, key)}).{did_you_mean(str(key), list(params))} "
                              f"Known: {', '.join(params)}", key=child(path, key))
        out[key] = check(value, hints.get(key, Any), child(path, key))
    return out


# -- evaluation sets ----------------------------------------------------------------------------
#: ``classes`` of an evaluation set or ``medkt evaluate --classes``: class -> prompts (a string is
#: one prompt; null = the templates), or a list of class names expanded with the templates
ClassPrompts = Union[dict[str, Union[str, list[str], None]], list[str]]


@dataclass
class EvaluationSpec:
    """One entry of a pipeline's ``evaluations`` (zero-shot classification sets). See
    `medkt.pipelines.transfer` for the meaning; each key is used by the pipelines noted."""

    config_name: typing.ClassVar[str] = "evaluation-set"

    manifest: str | None = None  # medkt manifest (path,label[,mask,split,sha256])
    root: str | None = None  # data root (default: the manifest's folder)
    split: str | None = None
    classes: ClassPrompts | None = None
    templates: list[str] | None = None  # "a photo of a {}." style, for class names without prompts
    class_names: dict[str, str] | None = None  # label -> display name used in the templates
    aggregate: Literal["mean", "mean_similarity", "max"] | None = None
    prompt_generator: dict[str, Any] | None = None  # {"name": "chexpert", ...} instead of classes
    skip_bad: bool = False
    title: str | None = None
    # {"source": "inversion", "n_images": 5, "seed": 1}: held-out inverted images (smoke check)
    source: Literal["inversion"] | None = None
    n_images: typing.Annotated[int, Range(ge=1)] = 5
    seed: int | None = None
    batch_size: typing.Annotated[int, Range(ge=1)] = 64  # images per encoder batch
    num_workers: typing.Annotated[int, Range(ge=0)] = 0  # DataLoader workers decoding images
    cache_dir: str | None = None  # embedding cache folder
    scoring: Literal["auto", "embedding", "itm"] | None = None  # default: the pipeline's
    text_batch_size: typing.Annotated[int, Range(ge=1)] = 128  # prompts per ITM batch (ViLT)

    def validate(self, path: str = "evaluation") -> None:
        """Require a ``manifest`` (unless ``source`` is set) and ``classes`` or a ``prompt_generator``."""
        if self.source is None and self.manifest is None:
            raise ConfigError(f"{path}: an evaluation set needs a 'manifest' (or \"source\": \"inversion\")", key=path)
        if self.source is None and self.classes is None and self.prompt_generator is None:
            raise ConfigError(f"{path}: an evaluation set needs 'classes' (class -> prompts, or a list of class "
                              "names) or a 'prompt_generator'", key=child(path, "classes"))


def check_pipeline_args(cls: type, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """Check a pipeline class's constructor arguments (``pipeline#...`` of a bundle): positional
    ones are matched to the most derived ``__init__``'s parameters, then every keyword is checked
    by `check_call` against the ``__init__`` chain (path ``pipeline#KEY``)."""
    named = dict(kwargs)
    if args:
        try:
            bound = inspect.signature(cls.__init__).bind_partial(None, *args)
        except TypeError:
            return  # the real __init__ call reports it
        for name, value in list(bound.arguments.items())[1:]:
            named.setdefault(name, value)
    check_call(cls, named, "pipeline", what=f"{cls.__name__}")
