"""Sphinx configuration of the normffn documentation.

Build (warnings are errors, as CI runs it)::

    pip install ".[docs]"
    sphinx-build -W -b html docs docs/_build/html

The API pages are generated from the docstrings (numpydoc format) of the *importable* normffn:
the installed package, or the source tree with ``PYTHONPATH=src`` after
``python setup.py build_ext --inplace``.  The ``docs`` extra does not pull in PyTorch or Dask:
the pages of ``normffn.torch`` and ``normffn.dask`` are built when those libraries are
importable and left out (with a note in the build log) when they are not.  CI installs both, so
the published site always has them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys

import normffn

project = "normffn"
author = "the normffn developers"
copyright = "the normffn developers"
release = normffn.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
]

root_doc = "index"
exclude_patterns = ["_build", "**/_build"]
templates_path: list[str] = []

# -- optional front ends: their API pages need the library they wrap ----------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
OPTIONAL_PAGES = {"torch": "api/torch.rst", "dask": "api/dask.rst"}
missing = [lib for lib in OPTIONAL_PAGES if importlib.util.find_spec(lib) is None]
for lib in missing:
    exclude_patterns.append(OPTIONAL_PAGES[lib])
    print(f"normffn docs: {lib} is not importable, so {OPTIONAL_PAGES[lib]} is left out "
          f"(pip install '.[{lib}]' to build it)", file=sys.stderr)

# -- autodoc / numpydoc ---------------------------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "none"             # the numpydoc Parameters sections say it in words
autodoc_inherit_docstrings = False     # normffn.torch modules subclass torch.nn classes
numpydoc_show_class_members = False    # members are listed explicitly on the API pages
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_xref_param_type = False

# -- HTML -----------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"normffn {release}"
html_theme_options = {
    "navigation_depth": 2,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_sidebars = {"index": []}
html_static_path: list[str] = []
html_show_sourcelink = False


# -- completeness check: every public name is on an API page ------------------------------------
_DIRECTIVE = re.compile(r"^\.\.\s+auto(?:function|class|data|attribute|method)::\s+(\S+)",
                        re.M)

# module -> API page that must document every name in its __all__
_PAGES = {
    "normffn": ["api/normffn.rst"],
    "normffn.batch_norm": ["api/normffn.rst"],
    "normffn.testing": ["api/testing.rst"],
    "normffn.reference": ["api/reference.rst"],
    "normffn.compare": ["api/testing.rst"],
    "normffn.torch": ["api/torch.rst"],
    "normffn.dask": ["api/dask.rst"],
}
# names a module exports that are documented elsewhere, or are not API (with the reason)
_ELSEWHERE = {
    "normffn.batch_norm": {"BatchNormContext", "batch_norm", "batch_norm_forward",
                           "batch_norm_backward"},      # on the page as normffn.<name>
    "normffn.compare": {"ComparisonRow", "documented_tolerance", "compare_outputs"},  # testing
}


def _check_api_pages(app):
    from sphinx.util import logging
    log = logging.getLogger("normffn.docs")
    for modname, pages in _PAGES.items():
        if any(p in exclude_patterns for p in pages):
            continue
        mod = importlib.import_module(modname)
        text = ""
        for p in pages:
            with open(os.path.join(HERE, p), encoding="utf-8") as f:
                text += f.read()
        documented = {name.rsplit(".", 1)[-1] for name in _DIRECTIVE.findall(text)}
        for name in getattr(mod, "__all__", ()):
            if name in documented or name in _ELSEWHERE.get(modname, ()):
                continue
            log.warning(f"{modname}.{name} is public (in __all__) but on no API page "
                        f"({', '.join(pages)})")


def _drop_missing_pages(app, docname, source):
    """Take the pages left out above off the API toctree (else Sphinx warns)."""
    if docname == "api/index":
        for lib in missing:
            page = OPTIONAL_PAGES[lib][len("api/"):-len(".rst")]
            source[0] = source[0].replace(f"\n   {page}\n", "\n")


def setup(app):
    app.connect("builder-inited", _check_api_pages)
    app.connect("source-read", _drop_missing_pages)
