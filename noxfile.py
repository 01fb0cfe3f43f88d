"""Compatibility matrix: the HuggingFace tests under each transformers release we claim.

    pip install nox && nox                 # every row of the matrix (about 3 minutes a row)
    nox -s "hf(transformers='4.57')"       # one row
    nox -l                                 # the rows

Each row is a fresh virtual environment with the CPU build of torch, the package with its
``test`` extra, and one transformers release; it runs the tests that touch transformers.
The oldest row is the lower bound of the ``transformers`` requirement in ``pyproject.toml``;
"newest" is whatever the package index serves today, as in CI.
"""
import nox

nox.options.reuse_venv = "yes"
nox.options.sessions = ["hf"]

# row name -> requirement
TRANSFORMERS = {
    "4.48": "transformers==4.48.*",
    "4.57": "transformers==4.57.*",
    "5.23": "transformers==5.23.*",
    "newest": "transformers",
}
HF_TESTS = ["tests/test_hf.py", "tests/test_hf_decoder.py", "tests/test_hf_sweep.py",
            "tests/test_cli.py", "tests/test_warnings.py"]
# the CPU build on this platform; a plain `torch` requirement would pull a CUDA build
TORCH = "torch==2.13.0"


@nox.session
@nox.parametrize("transformers", list(TRANSFORMERS))
def hf(session, transformers):
    """The HF tests under one transformers release (see TRANSFORMERS)."""
    session.install(TORCH)
    # the CUDA extension is not what this matrix tests: skip compiling it
    session.env["TOPKATTN_CUDA"] = "0"
    session.install("-e", ".[test]", TRANSFORMERS[transformers])
    session.run("python", "-c", "import transformers, torch; "
                "print('transformers', transformers.__version__, 'torch', torch.__version__)")
    session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", *HF_TESTS,
                *session.posargs)
