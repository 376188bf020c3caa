"""Sphinx configuration of genailab's documentation (Sphinx + MyST-NB).

Build with ``bash scripts/build_docs.sh`` (or ``make -C docs html``): warnings are errors, every
notebook page is executed, and a cell that raises fails the build.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Notebook kernels inherit this environment: the same small thread pools everywhere, so the
# tutorials take the time they say on a 2-core machine and give the same numbers each build.
for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(variable, "2")
os.environ.setdefault("PYTHONHASHSEED", "0")

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE / "_ext"))

import genailab  # noqa: E402

project = "genailab"
author = "genailab developers"
copyright = "2026, genailab developers"
release = genailab.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax served from the site itself: equations render offline too
    "sphinx.ext.viewcode",
    "genailab_api",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints", "README.md"]
templates_path: list[str] = []

# -- warnings are errors: the build is the docs' test ------------------------------------------
nitpicky = True
# Names from other libraries (no inventory is downloaded at build time, so they cannot link) and
# annotation spellings that are not objects. Our own names are never ignored: a reference to a
# genailab function that does not exist fails the build.
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|np|numpy|pd|pandas|sp|scipy|anndata|AnnData|ad|sc|scanpy|nn|matplotlib|plt|sklearn|click|numba)(\..*)?"),
    (r"py:.*", r"(Distribution|Tensor|Module|Optimizer|Path|Callable|Iterable|Iterator|Sequence|Mapping|Any|Axes|Figure|DataFrame|Series)"),
    (r"py:.*", r"(collections\.abc|typing|pathlib|os|dataclasses|enum|abc)\..*"),
    (r"py:.*", r"(int|float|str|bool|None|dict|list|tuple|object|bytes|type|array-like|array|optional|callable|sequence|mapping)"),
    (r"py:.*", r"(Group|NoneType)"),
    # napoleon reads "Width of c after embedding: ..." in a property's docstring as a type
    (r"py:class", r"(Width|c|.* .*)"),
]

# -- API reference -------------------------------------------------------------------------------
autodoc_default_options = {"member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_class_signature = "separated"
autodoc_inherit_docstrings = False
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_preprocess_types = False
napoleon_attr_annotations = False
add_module_names = False
python_use_unqualified_type_names = True

# -- MyST and notebooks --------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
# "force": every build runs every notebook (CI, a fresh clone). Set GENAILAB_DOCS_EXECUTE=cache for
# local edits: unchanged notebooks are then read from docs/_build/.jupyter_cache.
nb_execution_mode = os.environ.get("GENAILAB_DOCS_EXECUTE", "force")
nb_execution_cache_path = str(HERE / "_build" / ".jupyter_cache")
nb_execution_timeout = int(os.environ.get("GENAILAB_DOCS_CELL_TIMEOUT", "600"))
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_merge_streams = True
nb_kernel_rgx_aliases = {".*": "python3"}

# -- HTML ----------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"genailab {release}"
html_static_path: list[str] = []
html_last_updated_fmt = None
