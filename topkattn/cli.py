"""Command line interface: ``topkattn`` / ``python -m topkattn``.

``topkattn sweep`` runs :func:`topkattn.sweep.run` over a grid of (n, sigma, eps), writes
``sweep.csv``, ``sweep.json`` (records and a metadata block) and, when matplotlib is
installed, two PNG plots, and prints a summary table. With no arguments the command
runs ``sweep`` with its defaults.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np

from . import __version__, build_info
from . import sweep as _sweep

__all__ = ["main"]

_SUBCOMMANDS = ("sweep",)
_DEFAULTS = {"n": [1024, 4096, 16384, 65536], "sigma": [0.5, 1.0, 2.0, 3.0, 4.0],
             "eps": [1e-1, 1e-2, 1e-3], "rows": 64, "seed": 0}
_CSV, _JSON = "sweep.csv", "sweep.json"
_PLOT_RHO, _PLOT_BOUNDS = "rho_vs_sigma.png", "bound_tightness.png"


# ----------------------------------------------------------------- argument types

def _int_at_least(lo):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = "integer"
    return parse


def _float_where(ok, rule):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v
    parse.__name__ = "number"
    return parse


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="topkattn",
        description="Certified Top-k attention: tools around the topkattn C core.",
        epilog="With no arguments, runs 'sweep' with its defaults.")
    parser.add_argument("--version", action="version", version=f"topkattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser(
        "sweep", help="empirical k_eps vs the Gaussian rule over (n, sigma, eps)",
        description="Measure the oracle k_eps, the tail mass and the certified bounds over "
                    "a grid of (n, sigma, eps) and compare k_eps/n with the Gaussian design "
                    "rule (evaluated at the fitted sigma). Writes sweep.csv, sweep.json and "
                    "PNG plots (if matplotlib is installed) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sp.add_argument("--source", choices=sorted(_sweep.SOURCES), default="synthetic",
                    help="where the logits come from")
    sp.add_argument("--n", nargs="+", type=_int_at_least(2), default=_DEFAULTS["n"],
                    metavar="N", help="row lengths")
    sp.add_argument("--sigma", nargs="+", default=_DEFAULTS["sigma"], metavar="SIGMA",
                    type=_float_where(lambda v: math.isfinite(v) and v >= 0,
                                      "finite and >= 0"),
                    help="standard deviations of the logits")
    sp.add_argument("--eps", nargs="+", default=_DEFAULTS["eps"], metavar="EPS",
                    type=_float_where(lambda v: 0 < v < 1, "in the open interval (0, 1)"),
                    help="tail-mass budgets")
    sp.add_argument("--rows", type=_int_at_least(1), default=_DEFAULTS["rows"],
                    help="rows per (n, sigma)")
    sp.add_argument("--seed", type=_int_at_least(0), default=_DEFAULTS["seed"],
                    help="random seed")
    sp.add_argument("--out", default="topkattn-sweep", metavar="DIR",
                    help="output directory (created if needed)")
    sp.add_argument("--no-plots", dest="plots", action="store_false",
                    help="do not write PNG plots")
    sp.add_argument("--quiet", action="store_true",
                    help="no progress bar, no summary table")
    sp.set_defaults(func=_cmd_sweep)
    return parser


# ----------------------------------------------------------------- sweep command

def _jsonable(v):
    """Plain JSON value: NumPy scalars unwrapped, NaN and infinities as null."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _summary_table(df):
    t = df[["n", "sigma", "eps", "rho_median", "rho_rule", "rho_finite"]].copy()
    t["err_rule"] = (df["rho_rule"] - df["rho_median"]) / df["rho_median"]
    t["err_finite"] = (df["rho_finite"] - df["rho_median"]) / df["rho_median"]
    fmt = {
        "sigma": "{:g}".format, "eps": "{:g}".format,
        "rho_median": "{:.4e}".format, "rho_rule": "{:.4e}".format,
        "rho_finite": "{:.4e}".format,
        "err_rule": "{:+.2%}".format, "err_finite": "{:+.2%}".format,
    }
    body = t.to_string(index=False, formatters=fmt)
    note = ("rho = k_eps/n: rho_median is the empirical median over rows, rho_rule the "
            "asymptotic Gaussian rule and rho_finite the finite-n predictor (both at the "
            "fitted sigma); err_* = (predicted - empirical) / empirical.")
    return body + "\n" + note


def _write_plots(df, outdir):
    """Write the two PNG plots; returns their paths, or None if matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None

    ns = list(dict.fromkeys(df["n"].tolist()))
    epss = list(dict.fromkeys(df["eps"].tolist()))
    ncol = min(len(ns), 4)
    nrow = -(-len(ns) // ncol)
    colors = [f"C{i % 10}" for i in range(len(epss))]

    def figure():
        # Fixed margins: a layout engine costs seconds with log-scale ticks.
        width, height = 4.2 * ncol, 0.8 + 3.3 * nrow  # inches
        fig = Figure(figsize=(width, height))
        FigureCanvasAgg(fig)
        fig.subplots_adjust(left=0.8 / width, right=1 - 0.1 / width, bottom=0.5 / height,
                            top=1 - 0.65 / height, wspace=0.08, hspace=0.4)
        axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True).ravel()
        for ax in axes[len(ns):]:
            ax.set_visible(False)
        return fig, axes

    def style(ax, n):
        ax.set_yscale("log")
        ax.set_title(f"n = {n}")
        ax.set_xlabel("sigma")
        ax.grid(True, which="both", alpha=0.3)

    def positive(a):
        a = np.asarray(a, dtype=np.float64)
        return np.where(np.isfinite(a) & (a > 0), a, np.nan)

    paths = []

    fig, axes = figure()
    for ax, n in zip(axes, ns):
        for eps, c in zip(epss, colors):
            d = df[(df["n"] == n) & (df["eps"] == eps)].sort_values("sigma")
            s = d["sigma"].to_numpy()
            ax.fill_between(s, positive(d["k_eps_q25"] / n), positive(d["k_eps_q75"] / n),
                            color=c, alpha=0.2, linewidth=0)
            ax.plot(s, positive(d["rho_median"]), "o-", color=c, ms=3,
                    label=f"eps={eps:g} empirical")
            ax.plot(s, positive(d["rho_rule"]), "--", color=c, label=f"eps={eps:g} rule")
            ax.plot(s, positive(d["rho_finite"]), ":", color=c, lw=2,
                    label=f"eps={eps:g} finite-n")
        style(ax, n)
    axes[0].set_ylabel("k_eps / n  (median, IQR band)")
    axes[0].legend(fontsize="x-small")
    fig.suptitle("k_eps/n: empirical (solid, IQR band) vs rule (dashed) vs finite-n (dotted)")
    paths.append(os.path.join(outdir, _PLOT_RHO))
    fig.savefig(paths[-1], dpi=110)

    fig, axes = figure()
    for ax, n in zip(axes, ns):
        for eps, c in zip(epss, colors):
            d = df[(df["n"] == n) & (df["eps"] == eps)].sort_values("sigma")
            s = d["sigma"].to_numpy()
            tau = d["tau_at_k"].to_numpy()
            with np.errstate(divide="ignore", invalid="ignore"):
                gap = positive(d["gap_bound_at_k"].to_numpy() / tau)
                mg = positive(d["multigap_bound_at_k"].to_numpy() / tau)
            ax.plot(s, gap, "o-", color=c, ms=3, label=f"eps={eps:g} gap")
            ax.plot(s, mg, "s--", color=c, ms=3, label=f"eps={eps:g} multigap")
        ax.axhline(1.0, color="k", lw=0.8)
        style(ax, n)
    axes[0].set_ylabel("bound / tau at k_eps  (medians)")
    axes[0].legend(fontsize="x-small")
    fig.suptitle("Bound tightness at k_eps: single-gap (solid) and multi-gap (dashed); "
                 "1 = exact")
    paths.append(os.path.join(outdir, _PLOT_BOUNDS))
    fig.savefig(paths[-1], dpi=110)
    return paths


def _cmd_sweep(args):
    t0 = time.perf_counter()
    df = _sweep.run(source=args.source, eps=args.eps, n=args.n, sigma=args.sigma,
                    rows=args.rows, seed=args.seed, progress=not args.quiet)
    elapsed = time.perf_counter() - t0

    outdir = os.path.abspath(args.out)
    os.makedirs(outdir, exist_ok=True)
    written = []
    csv_path = os.path.join(outdir, _CSV)
    df.to_csv(csv_path, index=False)
    written.append(csv_path)

    meta = {
        "version": __version__,
        "build_info": build_info(),
        "arguments": {"source": args.source, "n": args.n, "sigma": args.sigma,
                      "eps": args.eps, "rows": args.rows, "seed": args.seed,
                      "multigap_cuts": _sweep.MULTIGAP_CUTS, "plots": args.plots},
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 3),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "columns": _sweep.COLUMNS,
    }
    json_path = os.path.join(outdir, _JSON)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(_jsonable({"metadata": meta, "records": df.to_dict(orient="records")}),
                  f, indent=1, allow_nan=False)
        f.write("\n")
    written.append(json_path)

    if args.plots:
        plots = _write_plots(df, outdir)
        if plots is None:
            print("topkattn: plots skipped: matplotlib is not installed "
                  "(pip install 'topkattn[plot]')", file=sys.stderr)
        else:
            written.extend(plots)
    if not args.quiet:
        print(_summary_table(df))
        print()
        print(f"{len(df)} rows in {elapsed:.1f} s; wrote:")
        for p in written:
            print(f"  {p}")
    return 0


# ----------------------------------------------------------------- entry point

def main(argv=None) -> int:
    """Run the command line interface; returns the exit status.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name (default: ``sys.argv[1:]``). Empty: run
        ``sweep`` with its defaults; leading options other than ``-h``/``--version``
        are passed to ``sweep``.

    Returns
    -------
    int
        0 on success, 2 for bad arguments, 1 for a failure while running.

    Examples
    --------
    >>> import tempfile
    >>> from topkattn.cli import main
    >>> main(["sweep", "--n", "256", "--sigma", "1", "--eps", "0.01", "--rows", "4",
    ...       "--quiet", "--no-plots", "--out", tempfile.mkdtemp()])
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["sweep"]
    elif argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        argv = ["sweep"] + argv
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (OSError, ImportError) as e:  # unwritable --out, pandas missing
        print(f"topkattn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("topkattn: interrupted", file=sys.stderr)
        return 130
