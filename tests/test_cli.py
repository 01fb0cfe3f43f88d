"""The command line interface: `topkattn sweep`, `python -m topkattn`, errors."""
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import topkattn
from topkattn import cli, sweep

pd = pytest.importorskip("pandas")

TINY = ["--source", "synthetic", "--n", "64", "200", "--sigma", "0.5", "2", "--eps", "0.1", "0.01", "--rows", "3",
        "--seed", "5"]
TINY_KW = dict(source="synthetic", n=[64, 200], sigma=[0.5, 2.0], eps=[0.1, 0.01], rows=3,
               seed=5)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("rho_vs_sigma.png", "bound_tightness.png")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(topkattn.__file__)))


def _hide_matplotlib(monkeypatch):
    """Make every `import matplotlib...` fail, as if it were not installed."""
    names = [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]
    for name in names + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)


def _run_module(*args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "topkattn", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _strict_json(path):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=refuse)


def test_sweep_writes_files_and_table(tmp_path, capsys):
    out = tmp_path / "res"
    assert cli.main(["sweep", *TINY, "--out", str(out), "--no-plots"]) == 0
    stdout, stderr = capsys.readouterr()

    df = pd.read_csv(out / "sweep.csv")
    expect = sweep.run(**TINY_KW, progress=False)
    assert list(df.columns) == list(sweep.COLUMNS)
    pd.testing.assert_frame_equal(df, expect, check_exact=False, rtol=1e-12)

    doc = _strict_json(out / "sweep.json")
    meta = doc["metadata"]
    assert meta["version"] == topkattn.__version__
    assert meta["build_info"]["simd_active"] == topkattn.get_simd()
    assert meta["arguments"]["n"] == [64, 200]
    assert meta["arguments"]["eps"] == [0.1, 0.01]
    assert meta["arguments"]["rows"] == 3 and meta["arguments"]["seed"] == 5
    assert meta["timestamp"].endswith("+00:00")
    assert set(meta["columns"]) == set(sweep.COLUMNS)
    assert len(doc["records"]) == len(expect) == 8
    assert doc["records"][0]["k_eps_median"] == expect["k_eps_median"][0]

    assert not any((out / p).exists() for p in PLOTS)
    for header in ("n", "sigma", "eps", "rho_median", "rho_rule", "rho_finite", "err_rule",
                   "err_finite"):
        assert header in stdout
    assert str(out / "sweep.csv") in stdout and str(out / "sweep.json") in stdout
    assert len([ln for ln in stdout.splitlines() if ln.strip().startswith("64 ")]) == 4


def test_plots_written_when_matplotlib_present(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["sweep", *TINY, "--out", str(tmp_path), "--quiet"]) == 0
    for p in PLOTS:
        with open(tmp_path / p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert capsys.readouterr() == ("", "")


def test_plots_skipped_without_matplotlib(tmp_path, capsys, monkeypatch):
    _hide_matplotlib(monkeypatch)
    assert cli.main(["sweep", *TINY, "--out", str(tmp_path)]) == 0
    stdout, stderr = capsys.readouterr()
    assert "plots skipped: matplotlib is not installed" in stderr
    assert (tmp_path / "sweep.csv").exists() and (tmp_path / "sweep.json").exists()
    assert not any((tmp_path / p).exists() for p in PLOTS)
    assert not any(p in stdout for p in PLOTS)


def test_quiet_prints_nothing(tmp_path, capsys):
    assert cli.main(["sweep", *TINY, "--out", str(tmp_path), "--quiet", "--no-plots"]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "sweep.csv").exists()


def test_no_arguments_runs_sweep_with_library_defaults(monkeypatch, tmp_path, capsys):
    """The bare command: the "bert" source with the library's defaults (model and texts
    left to the library), here on two short texts to keep the test fast."""
    pytest.importorskip("transformers")
    seen = {}
    real = sweep.run

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**{**kwargs, "texts": ["A short text.", "Another short text here."]})

    monkeypatch.setattr(sweep, "run", spy)
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    defaults = {k: v.default for k, v in inspect.signature(real).parameters.items()}
    for key in ("source", "eps", "texts", "layers", "max_length"):
        assert np.array_equal(np.asarray(seen[key], dtype=object),
                              np.asarray(defaults[key], dtype=object)), key
    assert seen["source"] == "bert" and seen["progress"] is True
    model, tok = seen["model"]
    assert model.config.num_hidden_layers == 6          # the built-in all-MiniLM-L6-v2
    out = tmp_path / "topkattn-sweep"
    df = pd.read_csv(out / "sweep.csv")
    assert list(df.columns) == list(sweep.BERT_COLUMNS)
    doc = _strict_json(out / "sweep.json")
    assert doc["metadata"]["arguments"]["source"] == "bert"
    assert len(doc["records"]) == 6 * 3                  # layers x eps
    for p in ("rho_by_layer.png", "rho_distribution.png", "bound_tightness.png"):
        with open(out / p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    stdout = capsys.readouterr().out
    for header in ("layer", "rho_median", "rho_rule", "gap/tau", "multigap/tau"):
        assert header in stdout


def test_leading_options_go_to_sweep(tmp_path, capsys):
    assert cli.main([*TINY, "--out", str(tmp_path), "--no-plots", "--quiet"]) == 0
    assert (tmp_path / "sweep.csv").exists()


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"topkattn {topkattn.__version__}"


def test_help(capsys):
    assert cli.main(["sweep", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--source", "--n", "--sigma", "--eps", "--rows", "--seed", "--out",
                "--no-plots", "--quiet", "--model", "--texts", "--text-file", "--layers",
                "--max-length"):
        assert opt in out
    assert cli.main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--eps", "--model", "--masked-lm", "--texts", "--layers", "--out"):
        assert opt in out


@pytest.mark.parametrize("args, message", [
    (["sweep", "--eps", "2"], "argument --eps: must be in the open interval (0, 1), got 2"),
    (["sweep", "--eps", "0"], "argument --eps"),
    (["sweep", "--n", "1"], "argument --n: must be >= 2, got 1"),
    (["sweep", "--n", "1e3"], "argument --n: expected an integer, got '1e3'"),
    (["sweep", "--sigma", "-1"], "argument --sigma: must be finite and >= 0"),
    (["sweep", "--sigma", "nan"], "argument --sigma"),
    (["sweep", "--rows", "0"], "argument --rows: must be >= 1"),
    (["sweep", "--seed", "-3"], "argument --seed"),
    (["sweep", "--source", "gpt"], "argument --source: invalid choice: 'gpt'"),
    (["sweep", "--n", "64"], "--n apply to --source synthetic only"),
    (["sweep", "--source", "synthetic", "--texts", "3"], "--texts apply to --source bert only"),
    (["evaluate", "--eps", "0"], "argument --eps: must be in the open interval (0, 1), got 0"),
    (["sweep", "--n"], "argument --n: expected at least one argument"),
    (["sweep", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments(args, message, capsys, tmp_path):
    assert cli.main([*args, "--out", str(tmp_path / "x")]
                    if args[0] in ("sweep", "evaluate") else args) == 2
    out, err = capsys.readouterr()
    assert message in err
    assert "usage:" in err
    assert not (tmp_path / "x").exists()


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert cli.main(["sweep", *TINY, "--out", str(blocker), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "topkattn sweep: error:" in err and str(blocker) in err
    assert "Traceback" not in err


def test_python_dash_m(tmp_path):
    r = _run_module("sweep", *TINY, "--out", "res", "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "rho_median" in r.stdout and "err_finite" in r.stdout
    assert (tmp_path / "res" / "sweep.csv").exists()
    assert (tmp_path / "res" / "sweep.json").exists()

    r = _run_module("sweep", "--eps", "1.5", cwd=tmp_path)
    assert r.returncode == 2
    assert "argument --eps: must be in the open interval (0, 1), got 1.5" in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("command", ["sweep", "evaluate"])
def test_help_states_each_default_once(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())       # undo the line wrapping
    assert "(default: None)" not in out and "(default: True)" not in out
    assert "(default: False)" not in out
    options = out.split(" --")[1:]
    for opt in options:
        assert opt.count("(default:") <= 1, opt
    assert "tail-mass budgets (default: 0.1 0.01 0.001)" in out
    assert "(default: 32)" in out and "(default: all)" in out
    if command == "sweep":
        assert "(default: 1024 4096 16384 65536)" in out and "(default: 64)" in out
        plots = next(o for o in options if o.startswith("no-plots"))
        assert "do not write PNG plots" in plots and "default" not in plots


def test_plot_functions_draw_on_given_axes():
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from topkattn import plots
    df = sweep.run(**TINY_KW, progress=False)
    fig = Figure()
    ax = fig.subplots(1, 2)
    plots.rho_vs_sigma(ax[0], df, 200)
    plots.bound_tightness_vs_sigma(ax[1], df, 200)
    assert ax[0].get_title() == "n = 200" and ax[0].get_yscale() == "log"
    assert len(ax[0].get_lines()) == 3 * 2 and len(ax[1].get_lines()) == 2 * 2 + 1
    assert set(plots.sweep_figures(df)) == {"rho_vs_sigma", "bound_tightness"}
