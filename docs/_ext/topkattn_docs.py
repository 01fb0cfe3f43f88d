"""Small Sphinx helpers for the topkattn documentation.

* ``.. topkattn-help:: sweep`` inserts the output of ``python -m topkattn sweep --help``,
  run at build time, so the documented options are always the real ones.
* ``.. topkattn-columns:: topkattn.sweep.COLUMNS`` renders a ``{column: meaning}``
  dictionary of the package as a table.
* After reading, every public name is checked to have an API entry: the public names of
  ``topkattn`` itself and the ``__all__`` of the public modules listed in
  :data:`PUBLIC_MODULES`. A missing one is a warning (an error under ``-W``).
* Module-level data without a doc comment (``#:``) would otherwise show the docstring of
  its type (``dict() -> new empty dictionary ...``); that text is dropped.
"""
from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util import logging
from sphinx.util.docutils import SphinxDirective

logger = logging.getLogger(__name__)

#: Modules whose ``__all__`` must be documented (besides the top-level ``topkattn``).
PUBLIC_MODULES = ("topkattn.hf", "topkattn.torch", "topkattn.sweep", "topkattn.plots",
                  "topkattn.reference", "topkattn.corpus")


class TopkattnHelp(SphinxDirective):
    """The ``--help`` text of a ``topkattn`` subcommand, as a literal block."""

    required_arguments = 0
    optional_arguments = 1
    option_spec = {"width": directives.positive_int}

    def run(self):
        args = [self.arguments[0]] if self.arguments else []
        env = dict(os.environ, COLUMNS=str(self.options.get("width", 88)), PYTHONIOENCODING="utf-8")
        cmd = [sys.executable, "-m", "topkattn", *args, "--help"]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120,
                                 check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            raise self.error(f"{' '.join(cmd[1:])} failed: {exc}") from None
        block = nodes.literal_block(out, out.rstrip())
        block["language"] = "text"
        return [block]


#: object name -> (text as written, text as reStructuredText). Plain-text formulas whose
#: ``|...|`` docutils reads as a substitution reference.
def process_docstring(app, what, name, obj, options, lines):
    if what in ("data", "attribute") and lines and not inspect.isroutine(obj) \
            and not inspect.isclass(obj) and not inspect.ismodule(obj):
        type_doc = inspect.getdoc(type(obj)) or ""
        if type_doc and "\n".join(lines).strip() == type_doc.strip():
            lines[:] = []


class TopkattnColumns(SphinxDirective):
    """A ``{name: meaning}`` dictionary of the package as a two-column table."""

    required_arguments = 1

    def run(self):
        modname, _, attr = self.arguments[0].rpartition(".")
        try:
            table = getattr(importlib.import_module(modname), attr)
        except (ImportError, AttributeError) as exc:
            raise self.error(f"cannot import {self.arguments[0]}: {exc}") from None
        rows = [("column", "meaning")] + [(str(k), str(v)) for k, v in table.items()]
        tgroup = nodes.tgroup(cols=2)
        for width in (1, 3):
            tgroup += nodes.colspec(colwidth=width)
        head, body = nodes.thead(), nodes.tbody()
        for i, (name, meaning) in enumerate(rows):
            row = nodes.row()
            name_node = nodes.Text(name) if i == 0 else nodes.literal(name, name)
            row += nodes.entry("", nodes.paragraph("", "", name_node))
            row += nodes.entry("", nodes.paragraph("", meaning))
            (head if i == 0 else body).append(row)
        tgroup += head
        tgroup += body
        return [nodes.table("", tgroup)]


def _public_names(app):
    """(qualified name, module) pairs that the API reference must describe."""
    from sphinx.ext.autodoc.mock import mock

    import __future__

    import topkattn
    expected = [f"topkattn.{name}" for name in dir(topkattn)
                if not name.startswith("_")
                and not inspect.ismodule(getattr(topkattn, name))
                and not isinstance(getattr(topkattn, name), __future__._Feature)]
    with mock(app.config.autodoc_mock_imports):
        for modname in PUBLIC_MODULES:
            mod = importlib.import_module(modname)
            expected += [f"{modname}.{name}" for name in getattr(mod, "__all__", [])]
    return expected


def check_api_complete(app, env):
    documented = set(env.get_domain("py").objects)
    missing = [name for name in _public_names(app) if name not in documented]
    if missing:
        logger.warning("public names without an API entry (add them to docs/api/*.rst): %s",
                       ", ".join(missing), type="topkattn", subtype="api")


def setup(app):
    app.add_directive("topkattn-help", TopkattnHelp)
    app.add_directive("topkattn-columns", TopkattnColumns)
    app.connect("env-check-consistency", check_api_complete)
    app.connect("autodoc-process-docstring", process_docstring)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
