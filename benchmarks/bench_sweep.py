"""Distributed "bert" sweeps: rows per second against the number of Dask workers, memory
per worker, dataset size, and the per-layer summary of a dataset against the in-process
sweep.

Modes:

* ``scaling``: the MiniLM sweep of ``--texts`` built-in corpus texts (default all 2,009)
  with ``--rows-per-head`` (default 8) on a LocalCluster of N worker processes (1 torch
  thread each) for each N of ``--workers`` (default 1 2; 0 = in this process), written to
  a Parquet dataset. Each cluster loads the model in every worker before the clock starts
  (``startup`` is reported apart); the timed part is ``sweep.run`` from the first task
  submitted to the last file written.
* ``full``: the same at every query row (no sampling) on ``--workers`` (default 2)
  workers, then the per-layer summary computed from the dataset (one layer and eps at a
  time) with this process's peak memory.
* ``check``: on ``--texts`` texts (default 100), the per-layer summary of the dataset
  written by 2 workers against ``sweep.summarize`` of the in-process DataFrame: equal, bit
  for bit, or the differences are printed.

The machine is reported with its load average before and after each run: on a shared
machine the numbers move with the other load, so each run also reports the CPU time its
tasks got (``task CPU s``, summed over workers) and that over the wall time (``CPU/wall``:
how many cores the workers actually had). Each run prints a JSON line, then a Markdown
table.

    nice python benchmarks/bench_sweep.py scaling                      # ~ minutes
    nice python benchmarks/bench_sweep.py scaling --texts 400 --workers 1 2
    nice python benchmarks/bench_sweep.py full                         # tens of minutes
    nice python benchmarks/bench_sweep.py check --texts 100
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pandas as pd  # noqa: E402

from _common import format_table, machine_line  # noqa: E402

from topkattn import hf, sweep  # noqa: E402


def _warm():
    """Run on each worker: load and keep the model (what the first task would do)."""
    from topkattn import _sweepstore
    _sweepstore._worker_model(None, 1)
    return os.getpid()


def _du(path):
    total = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            total += os.path.getsize(os.path.join(dirpath, n))
    return total


def _load():
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def one_run(workers, texts, rows_per_head, root, eps):
    """Time one sweep; returns a dict of measurements."""
    out = os.path.join(root, f"w{workers}-r{rows_per_head}")
    shutil.rmtree(out, ignore_errors=True)
    load_before = _load()
    t0 = time.perf_counter()
    kw = dict(source="bert", eps=eps, texts=texts, rows_per_head=rows_per_head,
              progress=sys.stderr.isatty(), out=out)
    if workers == 0:
        model = hf.load_model()
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        data = sweep.run(model=model, **kw)
        elapsed = time.perf_counter() - t1
    else:
        from dask.distributed import Client, LocalCluster
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            client.run(_warm)
            startup = time.perf_counter() - t0
            t1 = time.perf_counter()
            data = sweep.run(client=client, **kw)
            elapsed = time.perf_counter() - t1
    peaks = data.metadata["peak_rss_mib_by_worker"]
    with open(os.path.join(out, "_manifest.jsonl"), encoding="utf-8") as f:
        recs = [json.loads(ln) for ln in f]
    cpu = sum(r["cpu_seconds"] for r in recs)
    return {"workers": workers, "texts": texts, "rows_per_head": rows_per_head,
            "rows": data.rows, "tasks": data.config["tasks"], "seconds": round(elapsed, 2),
            "rows_per_s": round(data.rows / elapsed, 1), "startup_s": round(startup, 2),
            "task_cpu_s": round(cpu, 1), "cpu_per_wall": round(cpu / elapsed, 2),
            "rows_per_cpu_s": round(data.rows / cpu, 1),
            "peak_rss_mib_max": max(peaks.values()) if peaks else None,
            "peak_rss_mib": peaks, "dataset_mib": round(_du(out) / 2**20, 1),
            "load_before": load_before, "load_after": _load(), "path": out}


def _table(results, markdown=True):
    base = {r["texts"]: r for r in results if r["workers"] == 1}
    rows = []
    for r in results:
        b = base.get(r["texts"])
        ratio = f"{r['rows_per_s'] / b['rows_per_s']:.2f}x" if b else "-"
        rows.append([r["workers"] or "in-process", r["texts"], r["rows_per_head"] or "all",
                     f"{r['rows']:,}", r["tasks"], f"{r['seconds']:.1f}",
                     f"{r['rows_per_s']:,.0f}", ratio, f"{r['task_cpu_s']:.0f}",
                     f"{r['cpu_per_wall']:.2f}", f"{r['startup_s']:.1f}",
                     f"{r['peak_rss_mib_max']:.0f}", f"{r['dataset_mib']:.1f}",
                     f"{r['load_before']} / {r['load_after']}"])
    return format_table(["workers", "texts", "rows/head", "rows", "tasks", "sweep s",
                         "rows/s", "vs 1 worker", "task CPU s", "CPU/wall",
                         "startup s", "peak MiB/worker",
                         "dataset MiB", "load avg before / after"], rows, markdown=markdown)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["scaling", "full", "check"])
    p.add_argument("--texts", type=int, default=None)
    p.add_argument("--rows-per-head", type=int, default=8)
    p.add_argument("--workers", type=int, nargs="+", default=None)
    p.add_argument("--eps", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3])
    p.add_argument("--dir", default=None, help="where the datasets go (default: a "
                   "temporary directory, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the datasets")
    args = p.parse_args(argv)
    root = args.dir or tempfile.mkdtemp(prefix="bench-sweep-")
    os.makedirs(root, exist_ok=True)
    print(machine_line())
    try:
        if args.mode == "scaling":
            texts = args.texts or 2009
            results = []
            for w in args.workers or [1, 2]:
                r = one_run(w, texts, args.rows_per_head, root, args.eps)
                print(json.dumps(r), flush=True)
                results.append(r)
            print(_table(results))
        elif args.mode == "full":
            texts = args.texts or 2009
            (w,) = args.workers or [2]
            r = one_run(w, texts, None, root, args.eps)
            t = time.perf_counter()
            summary = sweep.summarize(r["path"])
            r["summary_s"] = round(time.perf_counter() - t, 2)
            r["driver_peak_rss_mib"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            print(json.dumps(r), flush=True)
            print(_table([r]))
            print(f"summary from the dataset in {r['summary_s']} s; this process's peak "
                  f"RSS {r['driver_peak_rss_mib']} MiB")
            with pd.option_context("display.width", 200, "display.max_columns", 20):
                print(summary.to_string(index=False))
        else:
            texts = args.texts or 100
            r = one_run(args.workers[0] if args.workers else 2, texts, None, root, args.eps)
            from_dataset = sweep.summarize(r["path"])
            df = sweep.run(source="bert", eps=args.eps, texts=texts, progress=False)
            in_process = sweep.summarize(df)
            same = from_dataset.equals(in_process)
            print(json.dumps({**r, "rows_in_process": len(df), "summary_equal": same}))
            if not same:
                print(from_dataset.compare(in_process))
            print(f"per-layer summary of {texts} texts, {len(df):,} rows: dataset written by "
                  f"{r['workers']} workers {'==' if same else '!='} in-process sweep")
    finally:
        if not (args.keep or args.dir):
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
