"""Sphinx configuration: the API reference, generated from the docstrings.

Sphinx (not mkdocs): autodoc reads the typed signatures and docstrings as
they are, and intersphinx links Python's own types (``ipaddress``,
``asyncio``, ``OSError``) to the Python documentation.  The Python inventory
is read from Debian's python3-doc package when it is installed (CI installs
it: this machine cannot reach docs.python.org), else fetched.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import spialloc  # noqa: E402

project = "spialloc"
release = version = spialloc.__version__
extensions = ["sphinx.ext.autodoc", "sphinx.ext.intersphinx"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autoclass_content = "both"
nitpicky = False
html_theme = "alabaster"
exclude_patterns = ["_build"]

# Debian's python3.11-doc has it at /usr/share/doc/python3.11/html (python3.11-dev
# and -venv link there too); any python3.X will do for links to the stdlib.
_local = sorted(Path("/usr/share/doc").glob("python3.*-doc/html/objects.inv"))
intersphinx_mapping = {"python": ("https://docs.python.org/3", str(_local[-1]) if _local else None)}
