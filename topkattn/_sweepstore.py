"""Running the tasks of a "bert" sweep (in this process or on a Dask cluster) and keeping
their rows as a Parquet dataset with a manifest of finished tasks.

Layout of a dataset directory (see :class:`topkattn.sweep.SweepDataset`)::

    _run.json             configuration, package versions, sessions and timing
    _manifest.jsonl       one JSON line per finished task (rows, files, worker, memory)
    layer=L/part-TTTTT.parquet
                          the rows of task TTTTT at layer L: one row group per eps, rows
                          within it ordered by (text, head, row)

A task's files are written under hidden temporary names and renamed into place; the task is
then appended to the manifest by the process that drives the sweep. A task that is not in
the manifest is run again (its files are overwritten, never duplicated), so an interrupted
sweep resumes where it stopped and a worker that dies mid-task costs only that task. Names
starting with ``_`` or ``.`` are skipped by Parquet readers (pyarrow, pandas, dask).
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import socket
import sys
import threading
import time
import uuid

import numpy as np

from . import build_info, hf, set_num_threads

RUN_FILE = "_run.json"
MANIFEST_FILE = "_manifest.jsonl"
FORMAT = 1

# Tests hold tasks at a known point with this variable: "PATH:FIRST" makes every task whose
# id is >= FIRST create "PATH.started-<task>-<pid>" once its rows are computed and wait
# (at most 300 s) for PATH to exist before writing them.
_GATE_ENV = "TOPKATTN_SWEEP_TEST_GATE"

_MODELS = {}
_MODELS_LOCK = threading.Lock()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def require_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.dataset  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ImportError("a sweep written to a directory (out=, --out) needs pyarrow: "
                          "pip install 'topkattn[dist]'") from None
    return pyarrow


def require_distributed():
    try:
        import distributed
    except ImportError:
        raise ImportError("a sweep on several workers needs dask.distributed: "
                          "pip install 'topkattn[dist]'") from None
    return distributed


# ----------------------------------------------------------------- plan bookkeeping

def texts_digest(texts):
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def expected_rows(lengths, layers, heads, n_eps, rows_per_head):
    rows = sum(T if rows_per_head is None else min(T, rows_per_head) for T in lengths)
    return int(rows) * layers * heads * n_eps


def model_name(model):
    if model is None:
        return "all-MiniLM-L6-v2 (built-in)"
    if isinstance(model, tuple):
        cfg = getattr(model[0], "config", None)
        return str(getattr(cfg, "_name_or_path", "") or type(model[0]).__name__)
    return os.fspath(model)


def describe_client(client):
    if client is None:
        return "in-process"
    try:
        info = client.scheduler_info()
        workers = info.get("workers", {})
        plural = "" if len(workers) == 1 else "s"
        return f"{len(workers)} worker{plural} at {client.scheduler.address}"
    except Exception:  # noqa: BLE001 - a description only
        return "dask cluster"


def versions():
    from importlib import metadata
    out = {"python": platform.python_version()}
    for name in ("topkattn", "numpy", "pandas", "pyarrow", "torch", "transformers",
                 "dask", "distributed", "tqdm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ----------------------------------------------------------------- running tasks

def _worker_model(name, threads):
    """The model of a worker process, loaded once per (name, threads) and kept, with a
    lock that serialises its use (capturing installs hooks on the model)."""
    with _MODELS_LOCK:
        if (name, threads) not in _MODELS:
            import torch
            torch.set_num_threads(threads)
            set_num_threads(threads)
            _MODELS[(name, threads)] = (hf.load_model(name), threading.Lock())
        return _MODELS[(name, threads)]


@contextlib.contextmanager
def torch_threads(count, here):
    """torch's thread count set to ``count`` while the sweep runs in this process
    (``here``), restored after."""
    if not here:
        yield
        return
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _gate(task_id):
    value = os.environ.get(_GATE_ENV)
    if not value:
        return
    path, _, first = value.rpartition(":")
    if task_id < int(first):
        return
    with open(f"{path}.started-{task_id}-{os.getpid()}", "w"):
        pass
    deadline = time.monotonic() + 300
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def _peak_rss_mib():
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):
        return None


def run_task(mdl, tok, spec, task):
    """Compute one task with ``spec["compute"]``; write its files if spec["out"] is set.
    Returns a manifest record (with the rows themselves under "blocks" when nothing is
    written)."""
    t0 = time.perf_counter()
    c0 = time.process_time()
    blocks = spec["compute"](mdl, tok, spec, task)
    _gate(task["id"])
    rec = {"task": task["id"], "texts": sum(len(b) for b in task["batches"]),
           "rows": int(sum(len(c["text"]) for c in blocks.values()))}
    if spec["out"] is None:
        rec["blocks"] = blocks
    else:
        rec["files"] = write_task(spec["out"], task["id"], blocks, spec)
    rec.update(seconds=round(time.perf_counter() - t0, 4),
               cpu_seconds=round(time.process_time() - c0, 4), host=socket.gethostname(),
               pid=os.getpid(), peak_rss_mib=_peak_rss_mib())
    return rec


def task_entry(spec, task):
    """What a Dask worker runs: the task, with the worker's cached model."""
    (mdl, tok), lock = _worker_model(spec["model"], spec["threads"])
    with lock:
        return run_task(mdl, tok, spec, task)


def _progress_bar(total, initial, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, unit="task", desc="topkattn sweep",
                file=sys.stderr, leave=False, dynamic_ncols=True)


def execute(tasks, spec, client, loaded, progress, initial):
    """Yield the record of each task as it finishes: in id order in this process
    (``client`` None, with the ``loaded`` (model, tokenizer)), else in completion order
    on the cluster, the costliest tasks submitted first."""
    initial = initial or 0
    bar = _progress_bar(len(tasks) + initial, initial, bool(progress))
    try:
        if client is None:
            mdl, tok = loaded
            for task in tasks:
                rec = run_task(mdl, tok, spec, task)
                if bar is not None:
                    bar.update(1)
                yield rec
            return
        distributed = require_distributed()
        tag = uuid.uuid4().hex[:10]
        pending = set()
        try:
            # the costliest first (texts are planned shortest first): the long tail of a
            # run is then made of short tasks
            for task in sorted(tasks, key=lambda t: (-t["cost"], t["id"])):
                pending.add(client.submit(task_entry, spec, task, pure=False,
                                          key=f"topkattn-sweep-{tag}-{task['id']:05d}",
                                          priority=task["cost"]))
            for fut in distributed.as_completed(list(pending)):
                rec = fut.result()
                pending.discard(fut)
                fut.release()
                if bar is not None:
                    bar.update(1)
                yield rec
        finally:
            if pending:
                client.cancel(list(pending))
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------- the files

def file_schema(columns):
    """The schema of the files: ``columns`` (those of a sweep's rows) without "source"
    (constant) and "layer" (the partition key)."""
    pa = require_pyarrow()
    types = {"text": pa.int64(), "head": pa.int64(), "row": pa.int64(), "n": pa.int64(),
             "eps": pa.float64(), "k_eps": pa.int64()}
    return pa.schema([(c, types.get(c, pa.float64())) for c in columns
                      if c not in ("source", "layer")])


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_task(root, task_id, blocks, spec):
    """Write a task's rows, one file per layer (a row group per eps); returns the paths
    relative to ``root``."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq
    schema = file_schema(spec["columns"])
    eps_values, layers = spec["eps"], spec["layers"]
    keys = sorted(blocks)
    cols = {c: np.concatenate([blocks[i][c] for i in keys]) for c in schema.names + ["layer"]}
    written = []
    for layer in layers:
        at_layer = cols["layer"] == layer
        rel = os.path.join(f"layer={layer}", f"part-{task_id:05d}.parquet")
        final = os.path.join(root, rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = os.path.join(os.path.dirname(final),
                           f".part-{task_id:05d}.{uuid.uuid4().hex}.tmp")
        try:
            with pq.ParquetWriter(tmp, schema, compression="zstd") as w:
                for e in eps_values:
                    m = at_layer & (cols["eps"] == e)
                    count = int(m.sum())
                    table = pa.table({c: cols[c][m] for c in schema.names}, schema=schema)
                    w.write_table(table, row_group_size=max(count, 1))
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        _fsync_dir(os.path.dirname(final))
        written.append(rel)
    return written


def _write_json_atomic(path, doc):
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_run(root):
    path = os.path.join(root, RUN_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{root}: not a sweep dataset (no {RUN_FILE})") from None


def read_manifest(root):
    """The finished tasks' records by task id (a torn last line is ignored, a record whose
    files are missing does not count)."""
    out = {}
    try:
        f = open(os.path.join(root, MANIFEST_FILE), encoding="utf-8")
    except FileNotFoundError:
        return out
    with f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or "task" not in rec:
                continue
            if all(os.path.exists(os.path.join(root, p)) for p in rec.get("files", ())):
                out[int(rec["task"])] = rec
    return out


class Store:
    """The dataset directory of one sweep, as seen by the process that drives it."""

    def __init__(self, root, meta):
        self.root = root
        self.meta = meta
        self._session = None
        self._t0 = None

    @classmethod
    def open(cls, out, config, resume):
        require_pyarrow()
        root = os.path.abspath(os.fspath(out))
        if os.path.exists(os.path.join(root, RUN_FILE)):
            meta = read_run(root)
            state = "complete" if meta.get("complete") else "unfinished"
            if not resume:
                raise FileExistsError(
                    f"{root} already holds a sweep ({state}); pass resume=True (--resume) "
                    "to continue it, or give another directory")
            old = meta.get("config", {})
            diff = sorted(k for k in set(config) | set(old) if config.get(k) != old.get(k))
            if diff:
                raise ValueError(f"cannot resume the sweep in {root}: it was run with other "
                                 f"settings ({', '.join(diff)} differ)")
        else:
            if os.path.isdir(root) and os.listdir(root):
                raise FileExistsError(f"{root} exists and is not empty; give a new or empty "
                                      "directory for the sweep's dataset")
            os.makedirs(root, exist_ok=True)
            meta = {"format": FORMAT, "source": "bert", "config": config, "complete": False,
                    "created": _now(), "sessions": []}
            _write_json_atomic(os.path.join(root, RUN_FILE), meta)
        # temporary files of tasks that never finished
        for dirpath, _, files in os.walk(root):
            for name in files:
                if name.startswith(".") and name.endswith(".tmp"):
                    os.remove(os.path.join(dirpath, name))
        return cls(root, meta)

    def finished(self):
        return set(read_manifest(self.root))

    def begin(self, workers, threads, todo):
        self._t0 = time.perf_counter()
        self._session = {"started": _now(), "workers": workers,
                         "threads_per_worker": threads, "tasks_to_run": todo}
        self.meta["versions"] = versions()
        self.meta["build_info"] = build_info()
        self.meta["complete"] = False
        self.meta["sessions"].append(self._session)
        _write_json_atomic(os.path.join(self.root, RUN_FILE), self.meta)
        path = os.path.join(self.root, MANIFEST_FILE)
        torn = False
        if os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._manifest = open(path, "a", encoding="utf-8")
        if torn:   # a process killed while appending: end its partial line
            self._manifest.write("\n")

    def record(self, rec):
        self._manifest.write(json.dumps(rec) + "\n")
        self._manifest.flush()
        os.fsync(self._manifest.fileno())

    def end(self, complete):
        self._manifest.close()
        done = read_manifest(self.root)
        s = self._session
        s["ended"] = _now()
        s["elapsed_s"] = round(time.perf_counter() - self._t0, 3)
        s["status"] = "complete" if complete else "interrupted"
        cfg = self.meta["config"]
        rows = int(sum(r["rows"] for r in done.values()))
        complete = complete and len(done) == cfg["tasks"] and rows == cfg["expected_rows"]
        self.meta.update(complete=complete, tasks_done=len(done), rows=rows,
                         elapsed_s=round(sum(x.get("elapsed_s", 0.0)
                                             for x in self.meta["sessions"]), 3))
        peaks = {}
        for r in done.values():
            key = f"{r.get('host')}:{r.get('pid')}"
            if r.get("peak_rss_mib") is not None:
                peaks[key] = max(peaks.get(key, 0.0), r["peak_rss_mib"])
        self.meta["peak_rss_mib_by_worker"] = {k: round(v, 1) for k, v in sorted(peaks.items())}
        _write_json_atomic(os.path.join(self.root, RUN_FILE), self.meta)


def remove(root):
    """Delete a sweep's dataset: only the files a sweep writes, then the directories
    left empty."""
    import re
    part = re.compile(r"^(part-\d{5}\.parquet|\.part-\d{5}\..*\.tmp)$")
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path) and re.match(r"^layer=-?\d+$", name):
            for f in os.listdir(path):
                if part.match(f):
                    os.remove(os.path.join(path, f))
            if not os.listdir(path):
                os.rmdir(path)
        elif name in (MANIFEST_FILE, RUN_FILE) or (name.startswith(".") and name.endswith(".tmp")):
            os.remove(path)
    if not os.listdir(root):
        os.rmdir(root)
