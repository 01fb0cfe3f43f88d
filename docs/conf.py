"""Sphinx configuration of the topkattn documentation.

Build (warnings are errors)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Needs the ``docs`` extra (``pip install -e ".[docs]"``) and the built package. The
notebooks are rendered with the outputs stored in them; nothing is executed.
"""
import filecmp
import glob
import importlib.util
import os
import shutil
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(DOCS)
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import topkattn  # noqa: E402  (the installed or in-place built package)

# ----------------------------------------------------------------- project

project = "topkattn"
author = "the topkattn authors"
copyright = "the topkattn authors"
release = topkattn.__version__
version = ".".join(release.split(".")[:2])

# ----------------------------------------------------------------- extensions

extensions = [
    "myst_nb",                 # Markdown (MyST) pages and .ipynb notebooks
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",                # NumPy-style docstrings
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax shipped with the pages: math renders offline too
    "sphinx.ext.viewcode",
    "topkattn_docs",           # docs/_ext: CLI help, API completeness check
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
templates_path = ["_templates"]

# MyST: $...$ and $$...$$ math, heading anchors for cross-links into design.md
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# Notebooks: rendered with their stored outputs (scripts/execute_notebooks.py makes them)
nb_execution_mode = "off"
nb_merge_streams = True

# ----------------------------------------------------------------- API reference

autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": False}
autodoc_member_order = "bysource"
autodoc_typehints = "none"          # the docstrings carry the types, with shapes
autoclass_content = "class"
numpydoc_show_class_members = False   # members are listed by the class template
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False
numpydoc_validation_checks = set()

# torch and transformers are optional: without them (a docs-only install) autodoc imports
# topkattn.torch and topkattn.hf against stand-ins.
def _missing(module):
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):
        return True


autodoc_mock_imports = [m for m in ("torch", "transformers") if _missing(m)]

# ----------------------------------------------------------------- HTML

html_theme = "pydata_sphinx_theme"
html_title = f"topkattn {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"index": []}
html_static_path = []
html_show_sourcelink = False


# ----------------------------------------------------------------- notebooks

def _sync_notebooks():
    """Copy notebooks/*.ipynb into docs/notebooks/ (generated, ignored by git) so that
    Sphinx, whose sources must lie under docs/, renders them. Unchanged files are left
    alone, so an incremental build does not re-read them."""
    dst_dir = os.path.join(DOCS, "notebooks")
    os.makedirs(dst_dir, exist_ok=True)
    wanted = set()
    for src in sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb"))):
        name = os.path.basename(src)
        wanted.add(name)
        dst = os.path.join(dst_dir, name)
        if not (os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False)):
            shutil.copyfile(src, dst)
    for old in glob.glob(os.path.join(dst_dir, "*.ipynb")):
        if os.path.basename(old) not in wanted:
            os.remove(old)


_sync_notebooks()
