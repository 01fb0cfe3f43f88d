"""Command line interface: ``topkattn`` / ``python -m topkattn``.

``topkattn sweep`` runs :func:`topkattn.sweep.run`: by default on the attention logits of
the built-in BERT model (all-MiniLM-L6-v2) over the built-in corpus, offline; with
``--source synthetic`` over a grid of (n, sigma, eps). It writes ``sweep.csv``,
``sweep.json`` (metadata and records, or per-layer summaries for "bert"), for "bert"
the rows as a Parquet dataset ``dataset/`` (on a Dask cluster with ``--workers`` or
``--scheduler``, resumable with ``--resume``) and, when
matplotlib is installed, PNG plots, and prints a summary table.

``topkattn evaluate --eps ...`` runs the model with certified Top-k attention and reports
keys kept, hidden-state drift, sentence-embedding cosine similarity and (masked-language
models) top-1 agreement against full attention (:func:`topkattn.hf.evaluate`).

With no arguments the command runs ``sweep`` with its defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np

from . import __version__, _sweepstore, build_info, corpus, hf, plots
from . import sweep as _sweep

__all__ = ["main"]

_SUBCOMMANDS = ("sweep", "evaluate")
_DEFAULTS = {"source": "bert", "eps": [1e-1, 1e-2, 1e-3], "seed": 0}
_CSV, _JSON = "sweep.csv", "sweep.json"
_EVAL_CSV, _EVAL_JSON = "evaluate.csv", "evaluate.json"


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


def _default(text, value):
    """A help text that states its default once (argparse adds none: options whose
    default is None describe what happens without them, flags need no default)."""
    return f"{text} (default: {value})"


def _build_parser():
    """The parser and its subcommand parsers by name."""
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
                    "PNG plots (if matplotlib is installed) to --out.")
    syn = _sweep.SYNTHETIC_DEFAULTS
    sp.add_argument("--source", choices=sorted(_sweep.SOURCES), default=_DEFAULTS["source"],
                    help=_default("where the logits come from: 'bert' = attention logits of "
                                  "a pretrained BERT model on real text (offline), "
                                  "'synthetic' = i.i.d. Gaussian rows", _DEFAULTS["source"]))
    _eps_option(sp)
    _model_options(sp, "bert source: ")
    sp.add_argument("--n", nargs="+", type=_int_at_least(2), default=None, metavar="N",
                    help=_default("synthetic source: row lengths", _fmt(syn["n"])))
    sp.add_argument("--sigma", nargs="+", default=None, metavar="SIGMA",
                    type=_float_where(lambda v: math.isfinite(v) and v >= 0,
                                      "finite and >= 0"),
                    help=_default("synthetic source: standard deviations of the logits",
                                  _fmt(syn["sigma"])))
    sp.add_argument("--rows", type=_int_at_least(1), default=None,
                    help=_default("synthetic source: rows per (n, sigma)", syn["rows"]))
    sp.add_argument("--seed", type=_int_at_least(0), default=_DEFAULTS["seed"],
                    help=_default("random seed of the synthetic source and of the rows "
                                  "--rows-per-head samples", _DEFAULTS["seed"]))
    sp.add_argument("--rows-per-head", type=_int_at_least(1), default=None, metavar="R",
                    help="bert source: measure R query rows per text, layer and head, "
                         "drawn from --seed, the text's index, the layer and the head (the "
                         "same for any number of workers); default: every row")
    sp.add_argument("--out", default="topkattn-sweep", metavar="DIR",
                    help=_default("output directory (created if needed); the bert source "
                                  "writes its rows there as a Parquet dataset, DIR/dataset",
                                  "topkattn-sweep"))
    dist = sp.add_argument_group(
        "distributed and resumable (bert source)",
        "The sweep is split into tasks (runs of texts); results do not depend on how many "
        "workers run them. Needs the dist extra (dask.distributed, pyarrow).")
    where = dist.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_int_at_least(1), default=None, metavar="N",
                       help="run the tasks on a local Dask cluster of N worker processes "
                            "(default: in this process)")
    where.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="run the tasks on the running Dask cluster of this scheduler "
                            "(e.g. tcp://10.0.0.5:8786); its workers need topkattn[hf,dist] "
                            "and must reach --out")
    dist.add_argument("--torch-threads", type=_int_at_least(1), default=1, metavar="N",
                      help=_default("torch threads of the forward passes, in this process "
                                    "or per worker (where the topkattn core gets as many); "
                                    "fixed so that the rows do not depend on where they "
                                    "are computed", 1))
    dist.add_argument("--task-size", type=_int_at_least(1), default=None, metavar="TEXTS",
                      help=_default("at most this many texts per task", _sweep.TASK_SIZE))
    dist.add_argument("--resume", action="store_true",
                      help="continue the interrupted sweep in --out (same settings): "
                           "finished tasks are kept, the rest run")
    dist.add_argument("--csv-max-rows", type=_int_at_least(0), default=1_000_000,
                      metavar="ROWS",
                      help=_default("write sweep.csv only for sweeps of at most this many "
                                    "rows; the Parquet dataset has every row", "1000000"))
    sp.add_argument("--no-plots", dest="plots", action="store_false",
                    help="do not write PNG plots (they are written when matplotlib is "
                         "installed)")
    sp.add_argument("--quiet", action="store_true",
                    help="no progress bar, no summary table")
    sp.set_defaults(func=_cmd_sweep)

    ep = sub.add_parser(
        "evaluate", help="what certified Top-k attention does to a BERT model",
        description="Run the model with certified Top-k attention (every query row keeps "
                    "the smallest top set whose discarded softmax mass is <= eps) and "
                    "compare with full attention: keys kept per layer, relative drift of "
                    "hidden states per layer, cosine similarity of sentence embeddings, "
                    "and top-1 agreement for masked-language models. Writes evaluate.csv "
                    "and evaluate.json to --out.")
    _eps_option(ep)
    _model_options(ep, "")
    ep.add_argument("--out", default="topkattn-evaluate", metavar="DIR",
                    help=_default("output directory (created if needed)",
                                  "topkattn-evaluate"))
    ep.add_argument("--quiet", action="store_true", help="no tables on stdout")
    ep.set_defaults(func=_cmd_evaluate)
    return parser, {"sweep": sp, "evaluate": ep}


def _fmt(values):
    return " ".join(f"{v:g}" for v in values)


def _eps_option(p):
    p.add_argument("--eps", nargs="+", default=_DEFAULTS["eps"], metavar="EPS",
                   type=_float_where(lambda v: 0 < v < 1, "in the open interval (0, 1)"),
                   help=_default("tail-mass budgets", _fmt(_DEFAULTS["eps"])))


def _model_options(p, prefix):
    p.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help=prefix + "BERT model: a name in the local HuggingFace cache (e.g. "
                        "bert-base-uncased) or a checkpoint directory; default: the built-in "
                        "all-MiniLM-L6-v2 (nothing is downloaded)")
    p.add_argument("--masked-lm", action="store_true",
                   help=prefix + "load the model with its masked-language-model head")
    p.add_argument("--texts", type=_int_at_least(1), default=None, metavar="COUNT",
                   help=_default(prefix + "number of built-in corpus texts (with "
                                 "--text-file: the first COUNT texts of the file)",
                                 _sweep.BERT_DEFAULT_TEXTS))
    p.add_argument("--text-file", default=None, metavar="PATH",
                   help=prefix + "your own texts instead of the corpus: a text file (one "
                        "text per line), JSON Lines (.jsonl, .ndjson, .json; see --field), "
                        "Parquet (.parquet, .pq; see --column) or a directory saved by "
                        "HuggingFace datasets (see --column; needs datasets)")
    p.add_argument("--field", default=None, metavar="KEY",
                   help=_default(prefix + "JSON Lines --text-file: the key of the text",
                                 "text"))
    p.add_argument("--column", default=None, metavar="NAME",
                   help=_default(prefix + "Parquet or dataset --text-file: the column of "
                                 "the text", "text"))
    p.add_argument("--layers", nargs="+", type=int, default=None, metavar="LAYER",
                   help=_default(prefix + "layers", "all"))
    p.add_argument("--max-length", type=_int_at_least(2), default=None, metavar="TOKENS",
                   help=_default(prefix + "truncate texts to this many tokens",
                                 "the model's maximum"))
    p.add_argument("--batch-size", type=_int_at_least(1), default=8,
                   help=_default(prefix + "texts per forward pass", 8))


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
    t = _sweep.prediction_errors(df)
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


def _write_plots(df, summary, outdir):
    """Write the PNG plots; returns their paths, or None if matplotlib is missing."""
    try:
        figures = plots.sweep_figures(df, summary)
    except ImportError:
        return None
    paths = []
    for stem, fig in figures.items():
        paths.append(os.path.join(outdir, stem + ".png"))
        fig.savefig(paths[-1], dpi=110)
    return paths


def _texts_arg(args):
    """The texts for the bert source / evaluate: a file's lines, a corpus count, or None."""
    if args.text_file is not None:
        return corpus.load(args.text_file, field=args.field, column=args.column,
                           count=args.texts)
    if args.field is not None or args.column is not None:
        raise ValueError("--field and --column apply to --text-file only")
    return args.texts


def _model_arg(args):
    return hf.load_model(args.model, masked_lm=args.masked_lm)


def _write_json(path, meta, records):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_jsonable({"metadata": meta, "records": records}), f, indent=1,
                  allow_nan=False)
        f.write("\n")


def _meta(elapsed, arguments, columns):
    return {
        "version": __version__,
        "build_info": build_info(),
        "arguments": arguments,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 3),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "columns": columns,
    }


def _library_versions():
    out = {}
    for name in ("torch", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", None)
    return out


def _client(args, stack):
    """A dask.distributed Client for --workers / --scheduler (closed by ``stack``), or
    None."""
    if args.workers is None and args.scheduler is None:
        return None
    distributed = _sweepstore.require_distributed()
    if args.scheduler is not None:
        return stack.enter_context(distributed.Client(args.scheduler))
    cluster = stack.enter_context(distributed.LocalCluster(
        n_workers=args.workers, threads_per_worker=1, processes=True,
        dashboard_address=":0"))
    return stack.enter_context(distributed.Client(cluster))


def _run_bert_sweep(args, outdir):
    """The bert sweep into OUT/dataset; returns (dataset, summary)."""
    _sweepstore.require_pyarrow()
    data_dir = os.path.join(outdir, "dataset")
    if not args.resume and os.path.exists(os.path.join(data_dir, _sweepstore.RUN_FILE)):
        if not _sweepstore.read_run(data_dir).get("complete"):
            raise FileExistsError(f"{data_dir} holds an unfinished sweep: --resume "
                                  "continues it (or remove the directory, or give another "
                                  "--out)")
        _sweepstore.remove(data_dir)   # a finished sweep is replaced, like its CSV
    texts = _texts_arg(args)
    with contextlib.ExitStack() as stack:
        client = _client(args, stack)
        # workers load the model by name; in this process it is loaded here
        model = args.model if client is not None else _model_arg(args)
        data = _sweep.run(source="bert", eps=args.eps, model=model, texts=texts,
                          layers=args.layers, max_length=args.max_length,
                          batch_size=args.batch_size, progress=not args.quiet,
                          seed=args.seed, rows_per_head=args.rows_per_head,
                          task_size=args.task_size, out=data_dir, resume=args.resume,
                          client=client, torch_threads=args.torch_threads)
    return data, _sweep.summarize(data)


def _have_pyarrow():
    try:
        import pyarrow.dataset  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _cmd_sweep(args):
    t0 = time.perf_counter()
    outdir = os.path.abspath(args.out)
    data = None
    if args.source == "bert":
        os.makedirs(outdir, exist_ok=True)
        if (_have_pyarrow() or args.workers is not None or args.scheduler is not None
                or args.resume):
            data, summary = _run_bert_sweep(args, outdir)
            rows = data.rows
            df = data.to_pandas() if rows <= args.csv_max_rows else None
        else:
            # without pyarrow: the rows in memory, as CSV only
            if not args.quiet:
                print("topkattn: no Parquet dataset: pyarrow is not installed (pip install "
                      "'topkattn[dist]')", file=sys.stderr)
            df = _sweep.run(source="bert", eps=args.eps, model=_model_arg(args),
                            texts=_texts_arg(args), layers=args.layers,
                            max_length=args.max_length, batch_size=args.batch_size,
                            progress=not args.quiet, seed=args.seed,
                            rows_per_head=args.rows_per_head, task_size=args.task_size,
                            torch_threads=args.torch_threads)
            summary = _sweep.summarize(df)
            rows = len(df)
    else:
        df = _sweep.run(source="synthetic", eps=args.eps, n=args.n, sigma=args.sigma,
                        rows=args.rows, seed=args.seed, progress=not args.quiet)
        summary = None
        rows = len(df)
    elapsed = time.perf_counter() - t0

    os.makedirs(outdir, exist_ok=True)
    written = []
    csv_path = os.path.join(outdir, _CSV)
    if df is not None:
        df.to_csv(csv_path, index=False)
        written.append(csv_path)
    elif os.path.exists(csv_path):
        os.remove(csv_path)   # an earlier sweep's, which would not match this one

    json_path = os.path.join(outdir, _JSON)
    if summary is None:
        syn = _sweep.SYNTHETIC_DEFAULTS
        arguments = {"source": args.source,
                     "n": list(syn["n"]) if args.n is None else args.n,
                     "sigma": list(syn["sigma"]) if args.sigma is None else args.sigma,
                     "eps": args.eps, "rows": syn["rows"] if args.rows is None else args.rows,
                     "seed": args.seed, "multigap_cuts": _sweep.MULTIGAP_CUTS,
                     "plots": args.plots}
        _write_json(json_path, _meta(elapsed, arguments, _sweep.COLUMNS),
                    df.to_dict(orient="records"))
    else:
        arguments = {"source": "bert", "model": args.model or "all-MiniLM-L6-v2",
                     "masked_lm": args.masked_lm, "eps": args.eps,
                     "texts": args.text_file or (args.texts or _sweep.BERT_DEFAULT_TEXTS),
                     "layers": args.layers, "max_length": args.max_length,
                     "rows_per_head": args.rows_per_head, "seed": args.seed,
                     "workers": args.workers, "scheduler": args.scheduler,
                     "rows": rows, "rows_in_csv": 0 if df is None else len(df),
                     "dataset": None if data is None else data.path,
                     "multigap_cuts": _sweep.MULTIGAP_CUTS,
                     "plots": args.plots}
        meta = _meta(elapsed, arguments, _sweep.SUMMARY_COLUMNS)
        meta["libraries"] = _library_versions()
        meta["csv_columns"] = _sweep.BERT_COLUMNS
        if data is not None:
            meta["run"] = {k: data.metadata.get(k) for k in
                           ("elapsed_s", "sessions", "peak_rss_mib_by_worker", "versions")}
        _write_json(json_path, meta, summary.to_dict(orient="records"))
    written.append(json_path)

    if args.plots:
        pngs = _write_plots(df if data is None else data, summary, outdir)
        if pngs is None:
            print("topkattn: plots skipped: matplotlib is not installed "
                  "(pip install 'topkattn[plot]')", file=sys.stderr)
        else:
            written.extend(pngs)
    if not args.quiet:
        print(_summary_table(df) if summary is None else _bert_table(summary))
        print()
        print(f"{rows} rows in {elapsed:.1f} s; wrote:")
        for p in written:
            print(f"  {p}")
        if data is not None:
            print(f"  {data.path}  (Parquet dataset: topkattn.sweep.open_dataset(path))")
            if df is None:
                print(f"  (no {_CSV}: more than --csv-max-rows {args.csv_max_rows} rows)")
    return 0


def _bert_table(summary):
    t = summary[["layer", "eps", "rows", "n_mean", "rho_median", "rho_rule_median",
                 "rho_finite_median", "sigma_fit_median", "gap_ratio_median",
                 "multigap_ratio_median"]].copy()
    t.columns = ["layer", "eps", "rows", "n_mean", "rho_median", "rho_rule", "rho_finite",
                 "sigma_fit", "gap/tau", "multigap/tau"]
    fmt = {"eps": "{:g}".format, "n_mean": "{:.1f}".format, "rho_median": "{:.4f}".format,
           "rho_rule": "{:.4f}".format, "rho_finite": "{:.4f}".format,
           "sigma_fit": "{:.3f}".format, "gap/tau": "{:.3f}".format,
           "multigap/tau": "{:.3f}".format}
    body = t.to_string(index=False, formatters=fmt)
    note = ("rho = k_eps/n per query row (n = the text's tokens); medians over texts, heads "
            "and rows. rho_rule = Phi_c(sigma_fit + Phi^-1(eps)), rho_finite the finite-n "
            "predictor, both at each row's fitted sigma; gap/tau and multigap/tau = certified "
            "bound over exact tail mass at k_eps (1 = exact).")
    return body + "\n" + note


def _cmd_evaluate(args):
    t0 = time.perf_counter()
    texts = _texts_arg(args)
    if texts is None or isinstance(texts, int):
        texts = corpus.texts(texts or _sweep.BERT_DEFAULT_TEXTS)
    model, tok = _model_arg(args)
    per_layer, per_model = hf.evaluate(model, tok, texts, eps=args.eps, layers=args.layers,
                                       max_length=args.max_length,
                                       batch_size=args.batch_size)
    elapsed = time.perf_counter() - t0
    outdir = os.path.abspath(args.out)
    os.makedirs(outdir, exist_ok=True)
    csv_path = os.path.join(outdir, _EVAL_CSV)
    per_layer.to_csv(csv_path, index=False)
    json_path = os.path.join(outdir, _EVAL_JSON)
    arguments = {"model": args.model or "all-MiniLM-L6-v2", "masked_lm": args.masked_lm,
                 "eps": args.eps, "texts": args.text_file or len(texts),
                 "layers": args.layers, "max_length": args.max_length}
    meta = _meta(elapsed, arguments, {**hf.EVALUATE_LAYER_COLUMNS,
                                      **hf.EVALUATE_MODEL_COLUMNS})
    meta["libraries"] = _library_versions()
    meta["model_records"] = per_model.to_dict(orient="records")
    _write_json(json_path, meta, per_layer.to_dict(orient="records"))
    if not args.quiet:
        fmt = {"eps": "{:g}".format, "n_mean": "{:.1f}".format, "k_mean": "{:.1f}".format,
               "kept_fraction": "{:.4f}".format, "tau_max": "{:.3g}".format,
               "hidden_drift": "{:.3e}".format, "hidden_drift_last": "{:.3e}".format,
               "cosine_mean": "{:.6f}".format, "cosine_min": "{:.6f}".format,
               "mlm_top1_agreement": "{:.4f}".format}
        print(per_layer.to_string(index=False, formatters=fmt))
        print()
        print(per_model.to_string(index=False, formatters=fmt))
        print()
        print("kept_fraction = keys kept / keys over real query rows; hidden_drift = "
              "||h_topk - h|| / ||h||; cosine_* = sentence embeddings (mean pooling) vs "
              "full attention; mlm_top1_agreement only for masked-language models.")
        print(f"{len(texts)} texts in {elapsed:.1f} s; wrote:\n  {csv_path}\n  {json_path}")
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
    parser, commands = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the message
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "sweep":
        bert_only = [o for o, v in (("--model", args.model), ("--masked-lm", args.masked_lm),
                                    ("--texts", args.texts), ("--text-file", args.text_file),
                                    ("--layers", args.layers),
                                    ("--max-length", args.max_length),
                                    ("--rows-per-head", args.rows_per_head),
                                    ("--field", args.field), ("--column", args.column),
                                    ("--workers", args.workers),
                                    ("--scheduler", args.scheduler),
                                    ("--task-size", args.task_size),
                                    ("--resume", args.resume)) if v]
        synthetic_only = [o for o, v in (("--n", args.n), ("--sigma", args.sigma),
                                         ("--rows", args.rows)) if v is not None]
        bad = bert_only if args.source == "synthetic" else synthetic_only
        if bad:
            other = "bert" if args.source == "synthetic" else "synthetic"
            try:
                commands["sweep"].error(f"{', '.join(bad)} apply to --source {other} only")
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else 2
    try:
        return args.func(args)
    except (OSError, ImportError, ValueError, TypeError) as e:
        # unwritable --out, a missing extra or model, an unsupported model or layer
        print(f"topkattn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = (" (finished tasks are kept: the same command with --resume continues)"
                if args.command == "sweep" and args.source == "bert" else "")
        print(f"topkattn: interrupted{hint}", file=sys.stderr)
        return 130
