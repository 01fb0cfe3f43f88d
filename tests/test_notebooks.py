"""Every notebook under notebooks/ executes cleanly, and is stored executed.

The notebooks are stored with their outputs (``python scripts/execute_notebooks.py``
regenerates them), so that readers and the documentation see results and figures. Here they
are executed again, whatever their stored outputs, in a fresh kernel started with *this*
interpreter (``sys.executable``, through a kernelspec written to a temporary directory),
with the repository on ``PYTHONPATH``, ``TOPKATTN_NB_SMALL=1`` (reduced sizes) and
``MPLBACKEND=Agg``.
"""
import glob
import json
import os
import sys

import pytest

import topkattn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(topkattn.__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
CELL_TIMEOUT_S = 120
KERNEL_NAME = "topkattn-test-python"
MAX_STORED_BYTES = 1_000_000  # outputs included (figures are stored at a modest resolution)
MISSING = ("executing the notebooks needs nbclient, nbformat and ipykernel; install the "
           "test extra (pip install -e '.[test]') or: pip install nbclient nbformat ipykernel")


def _ids(paths):
    return [os.path.relpath(p, REPO) for p in paths]


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found under {os.path.join(REPO, 'notebooks')}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_stored_executed(path):
    """Stored notebooks carry the outputs of one run from top to bottom without errors
    (execution counts 1, 2, 3, ...), and stay small."""
    rel = os.path.relpath(path, REPO)
    redo = "; re-execute it with: python scripts/execute_notebooks.py " + rel
    assert os.path.getsize(path) < MAX_STORED_BYTES, (
        f"{rel} is {os.path.getsize(path)} bytes, over {MAX_STORED_BYTES}: make its figures "
        "smaller or fewer")
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    code = [(i, cell) for i, cell in enumerate(nb["cells"])
            if cell["cell_type"] == "code" and "".join(cell["source"]).strip()]
    counts = [cell.get("execution_count") for _, cell in code]
    assert counts == list(range(1, len(code) + 1)), (
        f"{rel}: execution counts {counts} are not 1..{len(code)}" + redo)
    errors = [i for i, cell in code if any(o.get("output_type") == "error"
                                           for o in cell.get("outputs", []))]
    assert not errors, f"{rel}: code cells {errors} stored with an error output" + redo


def _kernel_env(monkeypatch):
    # Opt in to the platformdirs layout: jupyter_core 5.x before it became the default warns
    # (DeprecationWarning, an error under filterwarnings=error) when this is unset.
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("TOPKATTN_NB_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def _write_kernelspec(root):
    """A kernelspec that starts ipykernel with this interpreter, found first via
    JUPYTER_PATH (``<root>/kernels/<name>/kernel.json``)."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (topkattn tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return str(root)


# Appended to the in-memory copy only: proves the kernel runs in this interpreter's
# environment (a venv's sys.prefix differs from the base Python it links to).
PROBE = "import sys as _s; print('KERNEL-PREFIX=' + _s.prefix)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_executes(path, tmp_path, monkeypatch):
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError
        import ipykernel  # noqa: F401  (the kernel itself)
    except ImportError as exc:
        pytest.fail(f"{MISSING} ({exc})")

    _kernel_env(monkeypatch)
    # config, data and runtime (connection files) in a temp dir: nothing read from or
    # written to the user's Jupyter directories
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        monkeypatch.setenv(var, str(d))

    monkeypatch.setenv("JUPYTER_PATH", _write_kernelspec(tmp_path / "jupyter_path"))

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    # the client creates, owns and shuts down its kernel manager (and all its sockets)
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=CELL_TIMEOUT_S,
                            allow_errors=False,
                            resources={"metadata": {"path": os.path.dirname(path)}})
    try:
        client.execute()
    except CellExecutionError as exc:
        pytest.fail(f"{os.path.relpath(path, REPO)} raised in a cell:\n{exc}")

    probe_out = "".join(o.get("text", "") for o in nb.cells[-1].outputs
                        if o.output_type == "stream")
    assert f"KERNEL-PREFIX={sys.prefix}" in probe_out, (
        f"kernel did not run in this interpreter's environment ({sys.prefix}): {probe_out!r}")
