"""Every public name of the documented API has a docstring (the API reference is built from them).

Checked: every name ``import medkt`` exports, and every public class, function, method and
property defined in a module that the reference renders whole (the ``::: medkt.x`` lines of
``docs/``). ``make docs`` builds the reference itself (mkdocs --strict); this test is its fast,
always-run part.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"

#: module -> public names (relative) that still lack a docstring (none today; the mechanism stays
#: for a module added to the reference before its docstrings): the test fails on stale entries too.
KNOWN_MISSING: dict[str, set[str]] = {}

#: a Sphinx role (``:func:`x```): medkt's docstrings are Google style with Markdown code spans, which
#: mkdocstrings renders as they are; a role would show up verbatim in the reference
SPHINX_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const|type):`")


def documented_modules() -> list[str]:
    """Modules rendered whole by a ``::: medkt.x`` line of the docs (single objects excluded)."""
    names = set()
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"^::: (medkt[\w.]*)\s*$", page.read_text(), flags=re.M):
            try:
                importlib.import_module(target)
            except ImportError:
                continue  # an object inside a module, e.g. medkt.spine.transfer
            names.add(target)
    return sorted(names)


def has_docstring(obj: object) -> bool:
    """A real docstring: not empty and not the ``Name(field: type, ...)`` one ``@dataclass`` invents."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        try:
            invented = obj.__name__ + str(inspect.signature(obj)).replace(" -> None", "")
        except (TypeError, ValueError):
            invented = None
        return bool(doc) and doc != invented
    return bool(doc)


def _documented_member(cls: type, name: str, func: object) -> bool:
    # an override of a documented base method keeps its contract (and help() shows the base's doc)
    return has_docstring(func) or any(has_docstring(vars(base)[name]) for base in cls.__mro__[1:]
                                      if name in vars(base))


def missing_docstrings(module_name: str) -> set[str]:
    """Public names (relative to the module) defined in ``module_name`` without a docstring."""
    mod = importlib.import_module(module_name)
    out = set() if has_docstring(mod) else {"<module>"}
    for name, obj in vars(mod).items():
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module_name:
            continue  # imported from elsewhere: checked where it is defined
        if not has_docstring(obj):
            out.add(name)
        if inspect.isclass(obj):
            for mname, member in vars(obj).items():
                if mname.startswith("_"):
                    continue
                func = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(func) and not _documented_member(obj, mname, func):
                    out.add(f"{name}.{mname}")
    return out


def test_the_reference_covers_the_public_api():
    modules = documented_modules()
    assert {"medkt.api", "medkt.spine", "medkt.inversion", "medkt.finetune", "medkt.evaluation"} <= set(modules)
    assert set(KNOWN_MISSING) <= set(modules), "KNOWN_MISSING names a module the reference does not render"


def test_every_exported_name_has_a_docstring():
    import medkt

    assert has_docstring(medkt)
    bare = [n for n in medkt.__all__ if not has_docstring(getattr(medkt, n))
            and n not in KNOWN_MISSING.get(getattr(medkt, n).__module__, set())]
    assert not bare, f"exported without a docstring: {bare}"


def test_the_check_can_fail():
    @dataclasses.dataclass
    class Bare:
        x: int

    def f() -> None:
        pass

    assert not has_docstring(Bare) and not has_docstring(f) and has_docstring(has_docstring)


@pytest.mark.parametrize("module", documented_modules())
def test_documented_module_names_have_docstrings(module):
    missing = missing_docstrings(module)
    known = KNOWN_MISSING.get(module, set())
    new, stale = sorted(missing - known), sorted(known - missing)
    assert not new, f"public names without a docstring in {module}: {new}"
    assert not stale, f"these have a docstring now; remove them from KNOWN_MISSING: {stale}"


def sphinx_roles(root: Path) -> list[str]:
    """``file:line`` of every Sphinx role in the Python files under ``root``."""
    return [f"{p.relative_to(root.parent)}:{i}" for p in sorted(root.rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if SPHINX_ROLE.search(line)]


def test_docstrings_use_no_sphinx_roles(tmp_path):
    found = sphinx_roles(DOCS.parent / "medkt")
    assert not found, f"Sphinx roles (write `name` instead): {found[:10]}"
    (tmp_path / "m.py").write_text('"""See :func:`medkt.api.invert`."""\n')
    assert sphinx_roles(tmp_path) == [f"{tmp_path.name}/m.py:1"]  # the check can fail
