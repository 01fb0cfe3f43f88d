"""Figures of a k_eps sweep, drawn on matplotlib axes the caller provides.

Each axes-level function takes a ``matplotlib.axes.Axes`` and a DataFrame of
:func:`topkattn.sweep.run` or :func:`topkattn.sweep.summarize` and draws one panel (labels,
legend and grid included, no title unless the panel needs one to be told apart); one colour
per eps, the largest eps first. :func:`sweep_figures` lays the panels out as the PNG files
``topkattn sweep`` writes. Only :func:`sweep_figures` imports matplotlib.

Examples
--------
>>> from matplotlib.figure import Figure
>>> from topkattn import plots, sweep
>>> df = sweep.run(source="synthetic", n=[256], sigma=[1.0, 2.0], eps=[0.01], rows=4,
...                progress=False)
>>> ax = Figure().subplots()
>>> plots.rho_vs_sigma(ax, df, 256)
>>> ax.get_title()
'n = 256'
"""
from __future__ import annotations

import numpy as np

__all__ = ["rho_vs_sigma", "bound_tightness_vs_sigma", "rho_by_layer", "rho_distribution",
           "bound_tightness_by_layer", "sweep_figures"]


def _colors(eps_values):
    """One colour per eps, the largest eps first."""
    return {e: f"C{i % 10}" for i, e in enumerate(sorted(set(eps_values), reverse=True))}


def _positive(a):
    """Values to draw on a log axis: NaN where a value is not finite and positive."""
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan)


def _ratio(num, den):
    with np.errstate(divide="ignore", invalid="ignore"):
        return _positive(np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64))


def _sigma_panel(ax, n):
    ax.set_yscale("log")
    ax.set_title(f"n = {n}")
    ax.set_xlabel("sigma")
    ax.grid(True, which="both", alpha=0.3)


def _cells(df, n):
    """(eps, colour, rows of one n and eps sorted by sigma) of a synthetic sweep."""
    colors = _colors(df["eps"].tolist())
    for eps, c in colors.items():
        yield eps, c, df[(df["n"] == n) & (df["eps"] == eps)].sort_values("sigma")


def _layers(summary):
    """(eps, colour, rows of one eps sorted by layer) of a sweep summary."""
    for eps, c in _colors(summary["eps"].tolist()).items():
        yield eps, c, summary[summary["eps"] == eps].sort_values("layer")


def _layer_axis(ax, summary):
    ax.set_xticks(sorted(set(summary["layer"].tolist())))
    ax.set_xlabel("layer")


# ----------------------------------------------------------------- synthetic sweeps

def rho_vs_sigma(ax, df, n):
    """k_eps/n against sigma for rows of length ``n`` of a synthetic sweep: the empirical
    median with its IQR band (solid), the Gaussian rule (dashed) and the finite-n
    predictor (dotted), log scale."""
    for eps, c, d in _cells(df, n):
        s = d["sigma"].to_numpy()
        ax.fill_between(s, _positive(d["k_eps_q25"] / n), _positive(d["k_eps_q75"] / n),
                        color=c, alpha=0.2, linewidth=0)
        ax.plot(s, _positive(d["rho_median"]), "o-", color=c, ms=3,
                label=f"eps={eps:g} empirical")
        ax.plot(s, _positive(d["rho_rule"]), "--", color=c, label=f"eps={eps:g} rule")
        ax.plot(s, _positive(d["rho_finite"]), ":", color=c, lw=2,
                label=f"eps={eps:g} finite-n")
    _sigma_panel(ax, n)


def bound_tightness_vs_sigma(ax, df, n):
    """Certified bound / exact tau at k_eps against sigma for rows of length ``n`` of a
    synthetic sweep (medians): single-gap (solid), multi-gap (dashed); 1 = exact."""
    for eps, c, d in _cells(df, n):
        s = d["sigma"].to_numpy()
        ax.plot(s, _ratio(d["gap_bound_at_k"], d["tau_at_k"]), "o-", color=c, ms=3,
                label=f"eps={eps:g} gap")
        ax.plot(s, _ratio(d["multigap_bound_at_k"], d["tau_at_k"]), "s--", color=c, ms=3,
                label=f"eps={eps:g} multigap")
    ax.axhline(1.0, color="k", lw=0.8)
    _sigma_panel(ax, n)


# ----------------------------------------------------------------- sweeps of a model

def rho_by_layer(ax, summary):
    """Empirical k_eps/n per layer (median and IQR band) against the Gaussian rule at the
    fitted sigma, from :func:`topkattn.sweep.summarize`."""
    for eps, c, d in _layers(summary):
        x = d["layer"].to_numpy()
        ax.fill_between(x, d["rho_q25"], d["rho_q75"], color=c, alpha=0.2, lw=0)
        ax.plot(x, d["rho_median"], "o-", color=c, ms=4, label=f"eps={eps:g} empirical")
        ax.plot(x, d["rho_rule_median"], "s--", color=c, ms=3,
                label=f"eps={eps:g} Gaussian rule")
    _layer_axis(ax, summary)
    ax.set_ylabel("k_eps / n  (median, IQR band)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)


def rho_distribution(ax, df):
    """Histogram of k_eps/n over every layer, head and query row, one per eps, from the
    rows of :func:`topkattn.sweep.run` (``source="bert"``): a DataFrame, or a
    :class:`topkattn.sweep.SweepDataset`, which is read in batches."""
    bins = np.linspace(0.0, 1.0, 41)
    if hasattr(df, "rho_histograms"):
        hists = df.rho_histograms(bins)
    else:
        hists = {}
        for eps in dict.fromkeys(df["eps"].tolist()):
            rho = df.loc[df["eps"] == eps, "rho"].to_numpy()
            hists[eps] = (np.histogram(rho, bins=bins)[0], np.median(rho))
    for eps, c in _colors(list(hists)).items():
        counts, median = hists[eps]
        ax.stairs(counts / max(counts.sum(), 1) / np.diff(bins), bins, color=c, lw=1.5,
                  label=f"eps={eps:g} (median {median:.3f})")
    ax.set_xlabel("k_eps / n")
    ax.set_ylabel("density over rows")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def bound_tightness_by_layer(ax, summary):
    """Median certified bound / exact tau at k_eps per layer: single-gap (solid),
    multi-gap (dashed), log scale; 1 = exact."""
    for eps, c, d in _layers(summary):
        x = d["layer"].to_numpy()
        ax.plot(x, d["gap_ratio_median"], "o-", color=c, ms=4, label=f"eps={eps:g} gap")
        ax.plot(x, d["multigap_ratio_median"], "s--", color=c, ms=3,
                label=f"eps={eps:g} multigap")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    _layer_axis(ax, summary)
    ax.set_ylabel("bound / tau at k_eps  (median)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)


# ----------------------------------------------------------------- the figures of a sweep

def _figure(width, height, left, right, bottom, top, **adjust):
    """A Figure with fixed margins in inches (a layout engine costs seconds with
    log-scale ticks), drawn without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, **adjust)
    return fig


def _grid_figure(df, panel, ylabel, title):
    ns = list(dict.fromkeys(df["n"].tolist()))
    ncol = min(len(ns), 4)
    nrow = -(-len(ns) // ncol)
    fig = _figure(4.2 * ncol, 0.8 + 3.3 * nrow, 0.8, 0.1, 0.5, 0.65, wspace=0.08, hspace=0.4)
    axes = fig.subplots(nrow, ncol, squeeze=False, sharey=True).ravel()
    for ax in axes[len(ns):]:
        ax.set_visible(False)
    for ax, n in zip(axes, ns):
        panel(ax, df, n)
    axes[0].set_ylabel(ylabel)
    axes[0].legend(fontsize="x-small")
    fig.suptitle(title)
    return fig


def _single_figure(draw, data, title):
    fig = _figure(7.0, 4.2, 0.8, 0.2, 0.6, 0.55)
    draw(fig.add_subplot(1, 1, 1), data)
    fig.suptitle(title)
    return fig


def sweep_figures(df, summary=None):
    """The figures ``topkattn sweep`` writes, by file stem.

    Parameters
    ----------
    df : pandas.DataFrame or topkattn.sweep.SweepDataset
        :func:`topkattn.sweep.run` output (a dataset only for a model's sweep).
    summary : pandas.DataFrame, optional
        :func:`topkattn.sweep.summarize` of ``df`` for a sweep of a model (``"bert"``);
        None for a synthetic sweep.

    Returns
    -------
    dict of str -> matplotlib.figure.Figure
        Synthetic: ``rho_vs_sigma`` and ``bound_tightness`` (one panel per n). A model:
        ``rho_by_layer``, ``rho_distribution`` and ``bound_tightness``.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    """
    if summary is None:
        return {
            "rho_vs_sigma": _grid_figure(
                df, rho_vs_sigma, "k_eps / n  (median, IQR band)",
                "k_eps/n: empirical (solid, IQR band) vs rule (dashed) vs finite-n (dotted)"),
            "bound_tightness": _grid_figure(
                df, bound_tightness_vs_sigma, "bound / tau at k_eps  (medians)",
                "Bound tightness at k_eps: single-gap (solid) and multi-gap (dashed); "
                "1 = exact"),
        }
    return {
        "rho_by_layer": _single_figure(
            rho_by_layer, summary,
            "k_eps/n per layer: empirical vs Gaussian rule at the fitted sigma"),
        "rho_distribution": _single_figure(
            rho_distribution, df, "Distribution of k_eps/n over all layers, heads and rows"),
        "bound_tightness": _single_figure(
            bound_tightness_by_layer, summary,
            "Bound tightness at k_eps: single-gap (solid), multi-gap (dashed); 1 = exact"),
    }
