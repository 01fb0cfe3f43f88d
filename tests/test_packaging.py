"""The source distribution carries every file the build needs, and the metadata agrees.

The sdist's file list is MANIFEST.in applied by setuptools' own FileList (the machinery
``python -m build --sdist`` uses), so no build or network is needed here. What the build
needs is every C/CUDA/C++ source under csrc/ plus every project file they ``#include``,
transitively; a new header that MANIFEST.in does not match fails
``test_sdist_ships_every_build_input``. .ci/run builds the real sdist, a wheel from it and
installs that in a fresh virtual environment.
"""
import contextlib
import os
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
# the include path setup.py and nvcc use (-I csrc, -I csrc/cuda); quoted includes are
# looked up next to the including file first
INCLUDE_DIRS = [CSRC, CSRC / "cuda"]
SOURCE_SUFFIXES = (".c", ".cu", ".cpp")
INCLUDE_RE = re.compile(r'^\s*#\s*include\s*([<"])([^">]+)[">]', re.M)
# what the build reads besides csrc/, and the smoke test cibuildwheel runs from the sdist
BUILD_FILES = ["setup.py", "pyproject.toml", "README.md", "LICENSE",
               "scripts/smoke_test.py"]


def _file_list():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        egg_info = pytest.importorskip("setuptools.command.egg_info")
    return egg_info.FileList


def manifest_files(manifest_text):
    """Paths (relative, '/'-separated) that MANIFEST.in text selects in this checkout."""
    FileList = _file_list()
    fl = FileList()
    lines, cont = [], ""
    for raw in manifest_text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if line.endswith("\\"):
            cont += line[:-1] + " "
            continue
        line = (cont + line).strip()
        cont = ""
        if line:
            lines.append(line)
    with contextlib.ExitStack() as stack:
        old = os.getcwd()
        os.chdir(ROOT)                      # FileList works relative to the project root
        stack.callback(os.chdir, old)
        for line in lines:
            fl.process_template_line(line)
    return {Path(os.path.normpath(f)).as_posix() for f in fl.files}


def _resolve(include, kind, src):
    """The project file `#include` names from src, or None (a system header)."""
    dirs = ([src.parent] if kind == '"' else []) + INCLUDE_DIRS
    for d in dirs:
        p = (d / include).resolve()
        if p.is_file() and ROOT in p.parents:
            return p
    return None


def build_inputs():
    """Every source under csrc/ and every project file they include, transitively,
    as relative '/'-separated paths; plus the top-level files the build reads."""
    todo = sorted(p for p in CSRC.rglob("*") if p.suffix in SOURCE_SUFFIXES)
    seen, unresolved = set(), []
    while todo:
        src = todo.pop()
        if src in seen:
            continue
        seen.add(src)
        for kind, name in INCLUDE_RE.findall(src.read_text(errors="replace")):
            hit = _resolve(name, kind, src)
            if hit is not None:
                todo.append(hit)
            elif kind == '"':
                unresolved.append(f"{src.relative_to(ROOT)}: #include \"{name}\"")
    assert not unresolved, "quoted includes that are not in the checkout:\n" + "\n".join(unresolved)
    return {p.relative_to(ROOT).as_posix() for p in seen} | set(BUILD_FILES)


def test_build_inputs_follow_includes():
    """The include scan is not vacuous: it reaches the headers the issue was about."""
    needed = build_inputs()
    for path in ("csrc/attention.c", "csrc/internal.h", "csrc/topkattn.h", "csrc/pyutil.h",
                 "csrc/search.h", "csrc/cpu/kernels.inc", "csrc/cuda/rows.cu",
                 "csrc/cuda/common.cuh", "csrc/cuda/tka_cuda.h", "csrc/cuda/emu/emu.h",
                 "csrc/cuda/row_kernels.cuh"):
        if (ROOT / path).exists():
            assert path in needed, path


def test_sdist_ships_every_build_input():
    shipped = manifest_files((ROOT / "MANIFEST.in").read_text())
    missing = sorted(build_inputs() - shipped)
    assert not missing, ("the sdist would lack files the build needs; add them to "
                         "MANIFEST.in:\n  " + "\n  ".join(missing))


def test_unshipped_header_is_caught():
    """A manifest that ships only the .c files (as the setup.py defaults do) misses headers."""
    shipped = manifest_files("include setup.py pyproject.toml README.md LICENSE\n"
                             "recursive-include csrc *.c *.cu *.cpp\n")
    missing = build_inputs() - shipped
    assert {"csrc/internal.h", "csrc/cpu/kernels.inc"} <= missing


def test_sdist_ships_no_build_products():
    shipped = manifest_files((ROOT / "MANIFEST.in").read_text())
    junk = sorted(p for p in shipped
                  if p.endswith((".pyc", ".pyo", ".so", ".o")) or "__pycache__" in p)
    assert not junk, junk


def test_metadata_is_consistent():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = cfg["project"]

    init = (ROOT / "topkattn" / "__init__.py").read_text()
    literal = re.search(r'^__version__ = "([^"]+)"', init, re.M)
    if literal:                             # a version written twice must agree
        assert project["version"] == literal.group(1)

    # SPDX license + license-files (PEP 639) need setuptools >= 77, and no license classifier
    assert project["license"] == "MIT"
    for f in project["license-files"]:
        assert (ROOT / f).is_file(), f
    assert not any(c.startswith("License ::") for c in project["classifiers"])
    req = next(r for r in cfg["build-system"]["requires"] if r.startswith("setuptools"))
    assert int(re.search(r">=\s*(\d+)", req).group(1)) >= 77, req

    # the CPython versions: requires-python, the classifiers and the wheels built agree
    low = int(re.fullmatch(r">=\s*3\.(\d+)", project["requires-python"]).group(1))
    classified = sorted(int(m) for c in project["classifiers"]
                        for m in re.findall(r"^Programming Language :: Python :: 3\.(\d+)$", c))
    cibw = cfg["tool"]["cibuildwheel"]
    built = sorted(int(m) for m in re.findall(r"\bcp3(\d+)-", " ".join(cibw["build"])))
    assert classified == built and built[0] == low, (project["requires-python"], classified, built)
    assert classified == list(range(low, classified[-1] + 1))
    # distributed wheels are CPU-only (the CUDA extension is optional) and smoke-tested
    assert cibw["environment"]["TOPKATTN_CUDA"] == "0"
    assert "scripts/smoke_test.py" in cibw["test-command"]
