#!/usr/bin/env python3
"""Re-execute the notebooks under notebooks/ in place and store their outputs.

The notebooks are kept in the repository *with* their outputs, so that a reader sees the
results and figures without running anything, and the documentation renders them as they
are. This script is the one way to regenerate those outputs after a notebook or the
library changes:

    python scripts/execute_notebooks.py                      # every notebook
    python scripts/execute_notebooks.py notebooks/02_*.ipynb # some of them

Each notebook runs top to bottom in a fresh kernel started with *this* interpreter, with
the repository first on ``PYTHONPATH`` and at the small settings the tests use
(``TOPKATTN_NB_SMALL=1``); the notebooks seed their own random generators, so reruns give
the same numbers (timings and temporary paths aside). Figures are stored as PNG at a
modest resolution (``--dpi``, default 80) so that each notebook stays well under 1 MB.
Cell timing metadata is not recorded. Nothing is read from or written to the user's
Jupyter or IPython configuration directories.

Needs nbclient, nbformat and ipykernel (``pip install -e '.[test]'``) and whatever the
notebooks import (the ``hf`` extra: torch, transformers, the built-in model).
"""
from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL_NAME = "topkattn-notebooks-python"
MAX_BYTES = 1_000_000


def _kernelspec(root):
    """A kernelspec that starts ipykernel with this interpreter (found via JUPYTER_PATH)."""
    spec_dir = os.path.join(root, "kernels", KERNEL_NAME)
    os.makedirs(spec_dir)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3",
        "language": "python",
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w", encoding="utf-8") as f:
        json.dump(spec, f)


def _environment(tmp, dpi):
    """Environment for the kernels: small settings, the repository on the path, isolated
    Jupyter/IPython directories, a matplotlibrc that sets the figure resolution, and no
    progress bars."""
    env = {
        "TOPKATTN_NB_SMALL": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
        "JUPYTER_PLATFORM_DIRS": "1",
        "JUPYTER_PATH": tmp,
        "IPYTHONDIR": os.path.join(tmp, "ipython"),
        "MATPLOTLIBRC": os.path.join(tmp, "matplotlibrc"),
        "PYTHONHASHSEED": "0",
        # progress bars and the notice that ipywidgets is missing are noise in stored
        # outputs (and the notice names a local path)
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore:IProgress not found",
    }
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        env[var] = os.path.join(tmp, var.lower())
        os.makedirs(env[var])
    with open(env["MATPLOTLIBRC"], "w", encoding="utf-8") as f:
        f.write(f"figure.dpi: {dpi}\nsavefig.dpi: {dpi}\n")
    return env


def _clean(nb, metadata):
    """Restore the notebook-level metadata and drop per-cell execution metadata."""
    nb.metadata = metadata
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        cell.metadata.pop("ExecuteTime", None)


def execute(path, timeout, nbformat, NotebookClient):
    nb = nbformat.read(path, as_version=4)
    metadata = copy.deepcopy(nb.metadata)
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=timeout, allow_errors=False,
                            record_timing=False,
                            resources={"metadata": {"path": os.path.dirname(path)}})
    client.execute()
    _clean(nb, metadata)
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return os.path.getsize(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*",
                    help="notebooks to execute (default: every notebooks/*.ipynb)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds allowed per cell")
    ap.add_argument("--dpi", type=int, default=80, help="resolution of stored figures")
    args = ap.parse_args(argv)
    try:
        import nbformat
        from nbclient import NotebookClient
        import ipykernel  # noqa: F401  (the kernel the notebooks run in)
    except ImportError as exc:
        sys.exit(f"executing the notebooks needs nbclient, nbformat and ipykernel "
                 f"(pip install -e '.[test]'): {exc}")
    paths = args.notebooks or sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
    if not paths:
        sys.exit("no notebooks found")
    too_big = []
    with tempfile.TemporaryDirectory(prefix="topkattn-notebooks-") as tmp:
        _kernelspec(tmp)
        saved = dict(os.environ)
        os.environ.update(_environment(tmp, args.dpi))
        os.environ.pop("MPLBACKEND", None)  # the kernel picks the inline backend itself
        try:
            for path in paths:
                path = os.path.abspath(path)
                rel = os.path.relpath(path, REPO)
                t0 = time.perf_counter()
                print(f"executing {rel} ...", flush=True)
                size = execute(path, args.timeout, nbformat, NotebookClient)
                print(f"  done in {time.perf_counter() - t0:.0f} s, {size / 1e3:.0f} kB",
                      flush=True)
                if size > MAX_BYTES:
                    too_big.append(rel)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    if too_big:
        sys.exit(f"larger than {MAX_BYTES // 1000} kB (lower --dpi or the figure sizes): "
                 + ", ".join(too_big))


if __name__ == "__main__":
    main()
