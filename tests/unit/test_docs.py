"""The API reference (docs/, Sphinx autodoc) covers every public name, and
every public method and property has a docstring for it to show.  CI builds
it with warnings as errors: python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

import spialloc

API = (Path(__file__).resolve().parents[2] / "docs" / "api.rst").read_text()
DOCUMENTED = set(re.findall(r"^\.\. auto(?:class|exception|function|data):: (\w+)", API, re.M))
PUBLIC = sorted(set(spialloc.__all__) - {"backend", "__version__"})


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_in_the_reference(name: str) -> None:
    assert name in DOCUMENTED, f"add `.. autoX:: {name}` to docs/api.rst"


def members(cls: type) -> list[tuple[str, object]]:
    out = []
    for name in vars(cls):
        if name.startswith("_"):
            continue
        obj = inspect.getattr_static(cls, name)
        if isinstance(obj, (property, staticmethod, classmethod)) or inspect.isfunction(obj):
            out.append((f"{cls.__name__}.{name}", obj))
    return out


CLASSES = [getattr(spialloc, n) for n in PUBLIC if inspect.isclass(getattr(spialloc, n))]


MEMBERS = [m for c in CLASSES for m in members(c)]


@pytest.mark.parametrize("qualname,obj", MEMBERS, ids=[q for q, _ in MEMBERS])
def test_every_public_member_has_a_docstring(qualname: str, obj: object) -> None:
    fn = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
    assert (getattr(fn, "__doc__", None) or "").strip(), f"{qualname} has no docstring"


@pytest.mark.parametrize("name", ["allocate", "allocate_for", "allocate_many", "release", "lookup", "states"])
def test_allocator_calls_name_their_kernel_operation_and_errors(name: str) -> None:
    doc = inspect.getdoc(getattr(spialloc.Allocator, name)) or ""
    assert re.search(r"ALLOCSPI|DELSA|GETSA", doc), doc
    assert re.search(r"Raises", doc), doc
