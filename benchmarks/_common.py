"""Shared helpers for the scripts in benchmarks/: machine description, timing, the
machine's measured read bandwidth, and plain-text / Markdown tables.

Only NumPy and the standard library are needed here, so every benchmark can report
against the machine's limits whether or not its competitors are installed.
"""
from __future__ import annotations

import os
import platform
import statistics
import threading
import time

import numpy as np

# ------------------------------------------------------------------ machine

def cpu_model():
    """CPU model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count():
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cache_bytes(level):
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            if not d.startswith("index"):
                continue
            p = os.path.join(base, d)
            with open(os.path.join(p, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(p, "type")) as f:
                if f.read().strip() not in ("Unified", "Data"):
                    continue
            with open(os.path.join(p, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
            return int(s.rstrip("KkMmGg")) * mult
    except (OSError, ValueError):
        pass
    return None


def l3_bytes():
    """Size of the last-level (L3) cache in bytes, or None if unknown."""
    return _cache_bytes(3)


def machine_line():
    """One line: CPU model, CPU count, L3 size."""
    l3 = l3_bytes()
    l3s = f", L3 {l3 >> 20} MiB" if l3 else ""
    return f"{cpu_model()}, {cpu_count()} CPUs{l3s}, {platform.system()} {platform.machine()}"


# ------------------------------------------------------------------ timing

def time_call(fn, repeats=5, min_time=0.2, max_repeats=50, warmup=1):
    """Seconds per call of ``fn()``: (best, median) over the timed repeats.

    ``warmup`` untimed calls first (page faults, caches, lazy initialisation), then at
    least ``repeats`` timed calls, more (up to ``max_repeats``) until ``min_time``
    seconds have been spent timing.
    """
    for _ in range(warmup):
        fn()
    times = []
    spent = 0.0
    while len(times) < repeats or (spent < min_time and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
    return min(times), statistics.median(times)


def settle(max_wait=0.3, poll=0.01):
    """Wait (at most ``max_wait`` s) until no thread of this process burns CPU.

    A BLAS library's worker threads keep spinning for up to ~0.1 s after a matrix product
    returns (OpenBLAS on this kind of machine); a competitor timed in that window shares
    the cores with them. Returns the seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait:
        c0 = time.process_time()
        time.sleep(poll)
        if time.process_time() - c0 < 0.2 * poll:
            break
    return time.perf_counter() - t0


def time_calls(fns, repeats=5, min_time=0.2, max_repeats=50, budget=10.0, warm=None):
    """Best and median seconds per call for several competitors, timed in turns.

    The competitors take turns (rounds of a few consecutive calls of each), so a change in
    machine load during the measurement affects every competitor alike; before each turn
    the process settles (see ``settle``), so no competitor's leftover spinning threads
    (a BLAS pool's) take cores from the next, and a fast call is made once untimed. ``warm`` gives each one's untimed first call
    time when the caller has already made it (else a warm-up call is made here). Each gets
    at least ``repeats`` timed calls, fewer when a call is so slow that they would exceed
    ``budget`` seconds (never fewer than one), and more, up to ``max_repeats``, until
    ``min_time`` seconds of its calls were timed.

    Returns a list of (best, median) per function (None for a None entry).
    """
    live = [i for i, f in enumerate(fns) if f is not None]
    if warm is None:
        warm = [None] * len(fns)
    warm = list(warm)
    for i in live:
        if warm[i] is None:
            settle()
            t0 = time.perf_counter()
            fns[i]()
            warm[i] = time.perf_counter() - t0
    want = {i: max(1, min(repeats, int(budget / max(warm[i], 1e-9)))) for i in live}
    times = {i: [] for i in live}

    def needs(i):
        n, spent = len(times[i]), sum(times[i])
        return n < want[i] or (spent < min_time and n < max_repeats and want[i] == repeats)

    # calls per turn: a third of the wanted calls (three turns or more each); a turn starts
    # with an untimed call when calls are fast (the first call after the pause pays for
    # waking threads and caches), so the pause itself is never timed
    per_turn = {i: max(1, -(-want[i] // 3)) for i in live}
    while any(needs(i) for i in live):
        for i in live:
            if not needs(i):
                continue
            settle()
            if warm[i] < 0.05:
                fns[i]()
            for _ in range(per_turn[i]):
                if not needs(i):
                    break
                t0 = time.perf_counter()
                fns[i]()
                times[i].append(time.perf_counter() - t0)
    return [(min(times[i]), statistics.median(times[i])) if i in times else None
            for i in range(len(fns))]


# ------------------------------------------------------------------ bandwidth

def _reduce_fns():
    return {"sum": np.add.reduce, "max": np.maximum.reduce}


def measure_read_bandwidth(nbytes=1 << 30, threads=None, repeats=5):
    """Measured read bandwidth of main memory, in GB/s (1e9 bytes per second).

    Streams a float32 buffer of ``nbytes`` (choose it well above the last-level cache)
    through a SIMD reduction (``np.add.reduce`` and ``np.maximum.reduce``, which release
    the GIL), on one thread and on ``threads`` threads each reducing its own contiguous
    slice. For each thread count the best over both reductions and ``repeats`` passes is
    kept: the highest rate a plain streaming read reaches here.

    Returns
    -------
    dict with ``single`` and ``all`` (GB/s), ``threads``, ``nbytes`` and ``detail``
    ({(reduction, threads): GB/s}).
    """
    threads = threads or cpu_count()
    a = np.ones(nbytes // 4, dtype=np.float32)  # written once: every page is resident
    detail = {}

    def run_threads(fn, parts):
        ths = [threading.Thread(target=fn, args=(p,)) for p in parts]
        for t in ths:
            t.start()
        for t in ths:
            t.join()

    thread_counts = [1] if threads == 1 else [1, threads]
    for nt in thread_counts:
        parts = np.array_split(a, nt)
        for name, fn in _reduce_fns().items():
            if nt == 1:
                call = lambda fn=fn: fn(a)  # noqa: E731
            else:
                call = lambda fn=fn: run_threads(fn, parts)  # noqa: E731
            best, _ = time_call(call, repeats=repeats, min_time=0.0)
            detail[(name, nt)] = a.nbytes / best / 1e9
    del a
    single = max(v for (_, nt), v in detail.items() if nt == 1)
    multi = max(v for (_, nt), v in detail.items() if nt == thread_counts[-1])
    return {"single": single, "all": max(single, multi), "threads": threads,
            "nbytes": nbytes, "detail": detail}


# ------------------------------------------------------------------ tables

def format_table(headers, rows, markdown=False, align=None):
    """Fixed-width text table, or a GitHub Markdown table.

    ``rows`` hold strings (format numbers before); ``align`` is a string of 'l'/'r' per
    column (default: first column left, the rest right).
    """
    ncol = len(headers)
    align = align or ("l" + "r" * (ncol - 1))
    width = [max(len(str(headers[c])), *(len(str(r[c])) for r in rows)) for c in range(ncol)]

    def cell(s, c):
        s = str(s)
        return s.ljust(width[c]) if align[c] == "l" else s.rjust(width[c])

    out = []
    if markdown:
        out.append("| " + " | ".join(cell(h, c) for c, h in enumerate(headers)) + " |")
        out.append("|" + "|".join(("-" * (width[c] + 1) + ":") if align[c] == "r"
                                  else (":" + "-" * (width[c] + 1)) for c in range(ncol)) + "|")
        for r in rows:
            out.append("| " + " | ".join(cell(v, c) for c, v in enumerate(r)) + " |")
    else:
        out.append("  ".join(cell(h, c) for c, h in enumerate(headers)))
        out.append("  ".join("-" * width[c] for c in range(ncol)))
        for r in rows:
            out.append("  ".join(cell(v, c) for c, v in enumerate(r)))
    return "\n".join(out)


def fmt_ms(seconds):
    """Milliseconds with three significant digits ('-' for None)."""
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(num, den):
    """'12.3x' for num/den ('-' if either is missing)."""
    if num is None or den is None or den <= 0:
        return "-"
    r = num / den
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"
