"""Decode steps of a HuggingFace Llama-layout model: dense against exact Top-k against the
certified selector, at long contexts.

The model is a randomly initialised ``LlamaForCausalLM`` (float32, grouped-query attention:
hidden 1024, 8 query heads sharing 2 key/value heads of dimension 128, 2 layers, vocabulary
1000; set by the options). For each context n (default 8k, 32k, 128k tokens) a KV cache of n
random tokens is built, then each method generates ``--steps`` tokens greedily from it and
the time per decode step is measured:

* ``dense``: the model's own attention (``sdpa``);
* ``exact``: ``hf.use_topk_attention(model, eps=...)``, every decode row keeps its exact
  k_eps set through :func:`topkattn.topk_attention` (scores every key);
* ``certified``: ``hf.use_topk_attention(model, eps=..., selector="certified")``, every
  decode row runs :func:`topkattn.certified_attention` on one ``KeyIndex`` per layer and
  key/value head, appended with each new key.

**The cache.** A full prefill of 128k tokens costs O(n^2) (hours on two cores), so the
cache is built by a prefill of independent chunks of ``--chunk`` tokens (2048): each chunk
is run as its own sequence at its absolute positions (RoPE), and its keys and values fill a
``transformers.StaticCache`` (preallocated: a decode step writes one position instead of
copying the whole cache as ``DynamicCache`` does). Decode steps attend to the whole cache.
The cached keys are thus those of a model that saw its context in 2048-token windows; the
decode steps themselves are exact model computations.

**The data.** Random initialisation gives attention logits of a standard deviation of about
0.2: attention is close to uniform, k_eps is most of n, and no certificate can skip keys.
Two models are therefore reported: ``plain`` (as initialised) and ``peaked`` (the weights of
``q_proj`` and ``k_proj`` multiplied by ``--qk-scale``, default 4, so every logit is
multiplied by its square: a per-row logit standard deviation of several units, as in
trained models; the table shows the measured mean value). Tokens are uniform random.

Reported per (model, n, method): median milliseconds per decode step over the steps after
the first (the first decode step of the certified selector builds the index: its time is
the ``first`` column), the best of ``--repeats`` runs with the methods in turns; the
fraction of generated tokens equal to dense's (greedy, free-running from the same cache);
for the certified selector the mean keys scored / n and the largest ``tv_bound`` of any
decode row (from a separate recorded run: recording scores every key in float64); and where
a step's time goes: ``hook`` (inside the topkattn attention call), of which ``core`` (inside
``topk_attention`` / ``certified_attention``), and ``model`` (everything else: projections,
MLP, norms, cache update, masks).

    python benchmarks/bench_decode.py              # 8k, 32k, 128k: about 10 minutes
    python benchmarks/bench_decode.py --quick      # smoke run, seconds
    python benchmarks/bench_decode.py --markdown   # a table for a README
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

try:
    import topkattn  # noqa: F401
except ImportError:  # run from a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import torch
    import transformers
except ImportError as exc:  # the benchmark needs the "hf" extra
    torch = transformers = None
    _MISSING = exc

from topkattn import hf  # noqa: E402
from topkattn.hf import certified as _certified  # noqa: E402
from topkattn.hf import hooked as _hooked  # noqa: E402
from topkattn.hf import interface as _interface  # noqa: E402

METHODS = ("dense", "exact", "certified")


# ------------------------------------------------------------------ model and cache

def build_model(args, qk_scale):
    cfg = transformers.LlamaConfig(
        num_hidden_layers=args.layers, hidden_size=args.hidden,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, intermediate_size=2 * args.hidden, vocab_size=args.vocab,
        max_position_embeddings=max(args.contexts) + args.steps + 8,
        pad_token_id=0, eos_token_id=1, bos_token_id=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if qk_scale != 1.0:
        with torch.no_grad():
            for att in hf.attention_layers(model):
                att.q_proj.weight.mul_(qk_scale)
                att.k_proj.weight.mul_(qk_scale)
    return model


def build_cache(model, n, args):
    """A StaticCache holding n random tokens' keys and values (independent chunks at their
    absolute positions), room for the decode steps, and the last token's logits."""
    g = torch.Generator().manual_seed(args.seed + n)
    ids = torch.randint(2, args.vocab, (1, n), generator=g)
    cache = transformers.StaticCache(config=model.config, max_cache_len=n + args.steps + 1)
    logits = None
    with torch.no_grad():
        for off in range(0, n, args.chunk):
            chunk = ids[:, off:off + args.chunk]
            pos = torch.arange(off, off + chunk.shape[1])[None]
            out = model(input_ids=chunk, position_ids=pos, use_cache=True)
            part = out[_cache_field(model)]
            for i, layer in enumerate(cache.layers):
                layer.update(part.layers[i].keys, part.layers[i].values)
            logits = out.logits[:, -1]
    return cache, logits.argmax(-1, keepdim=True)


def _cache_field(model):
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _forward_params(model):
    import inspect
    return inspect.signature(model.forward).parameters


def _rewind(cache, n):
    """Forget the decode steps: the cache holds its n context tokens again."""
    for layer in cache.layers:
        layer.cumulative_length.fill_(n)


def logit_sd(model, cache, tok, n):
    """Mean over heads and layers of the standard deviation of one decode row's logits."""
    cap = hf.capture(model, {"input_ids": tok, _cache_field(model): cache})
    _rewind(cache, n)
    sds = []
    for x in cap.logits.values():
        x = x[..., :n + 1].astype(np.float64)
        sds.append(x.std(axis=-1).mean())
    return float(np.mean(sds))


# ------------------------------------------------------------------ timing

class Clock:
    """Accumulates the time spent in the hook and in the C core during a decode step."""

    def __init__(self):
        self.hook = self.core = 0.0

    @contextlib.contextmanager
    def installed(self):
        patches = [(_interface, "run_certified"), (_interface, "run_hooked")]
        core = [(_certified, "certified_attention"), (_hooked, "topk_attention")]
        saved = [(m, a, getattr(m, a)) for m, a in patches + core]

        def timed(fn, field):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - t0)
            return wrapper

        for m, a, fn in saved:
            setattr(m, a, timed(fn, "hook" if (m, a) in patches else "core"))
        try:
            yield self
        finally:
            for m, a, fn in saved:
                setattr(m, a, fn)


def decode(model, cache, tok, n, steps, clock=None):
    """Greedy decode steps from the cache; returns (tokens, seconds per step, hook and
    core seconds per step)."""
    name = _cache_field(model)
    toks, times, hooks, cores = [], [], [], []
    with torch.no_grad():
        for _ in range(steps):
            if clock is not None:
                clock.hook = clock.core = 0.0
            t0 = time.perf_counter()
            out = model(input_ids=tok, **{name: cache})
            times.append(time.perf_counter() - t0)
            if clock is not None:
                hooks.append(clock.hook)
                cores.append(clock.core)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            toks.append(int(tok))
    _rewind(cache, n)
    return toks, times, hooks, cores


def run_method(model, method, cache, tok, n, args, record=False):
    if method == "dense":
        ctx = contextlib.nullcontext(None)
    else:
        ctx = hf.use_topk_attention(model, eps=args.eps, prefill="dense", record=record,
                                    selector="certified" if method == "certified" else "exact")
    clock = Clock()
    with ctx as rec, clock.installed():
        toks, times, hooks, cores = decode(model, cache, tok, n, args.steps, clock)
    return toks, times, hooks, cores, rec


def measure(model, label, n, args):
    cache, tok = build_cache(model, n, args)
    sd = logit_sd(model, cache, tok, n)
    best = {m: None for m in METHODS}
    tokens = {}
    for _ in range(args.repeats):
        for m in METHODS:                     # methods in turns
            toks, times, hooks, cores, _ = run_method(model, m, cache, tok, n, args)
            tokens[m] = toks
            rest = slice(1, None) if len(times) > 1 else slice(None)
            med = statistics.median(times[rest])
            if best[m] is None or med < best[m]["step"]:
                best[m] = {"step": med, "first": times[0],
                           "hook": statistics.median(hooks[rest]),
                           "core": statistics.median(cores[rest])}
    _, _, _, _, rec = run_method(model, "certified", cache, tok, n, args, record=True)
    scored, visible, tvb = 0.0, 0.0, 0.0
    for layer in rec.layers:
        for ks, nn, t in zip(rec.keys_scored[layer], rec.n[layer], rec.tv_bound[layer]):
            if ks is not None:
                scored += ks.sum()
                visible += nn.sum()
                tvb = max(tvb, float(t.max()))
    rows = []
    for m in METHODS:
        b = best[m]
        agree = np.mean(np.array(tokens[m]) == np.array(tokens["dense"]))
        rows.append({"model": label, "n": n, "sd": sd, "method": m, **b, "agree": agree,
                     "scored": scored / visible if m == "certified" else None,
                     "tv_bound": tvb if m == "certified" else None})
    del cache
    return rows


# ------------------------------------------------------------------ report

def table(rows, markdown):
    ms = lambda s: f"{1e3 * s:.2f}" if s >= 0.01 else f"{1e3 * s:.3f}"  # noqa: E731
    head = ["model", "logit sd", "n", "method", "ms/step", "vs exact", "first ms",
            "hook ms", "core ms", "model ms", "tokens = dense", "scored/n", "max tv_bound"]
    out = []
    for r in rows:
        ex = next(x for x in rows if x["model"] == r["model"] and x["n"] == r["n"]
                  and x["method"] == "exact")
        dense = r["method"] == "dense"
        out.append([r["model"], f"{r['sd']:.2f}", f"{r['n']:,}", r["method"], ms(r["step"]),
                    _common.fmt_ratio(ex["step"], r["step"]), ms(r["first"]),
                    "-" if dense else ms(r["hook"]), "-" if dense else ms(r["core"]),
                    "-" if dense else ms(r["step"] - r["hook"]), f"{r['agree']:.2f}",
                    "-" if r["scored"] is None else f"{r['scored']:.3f}",
                    "-" if r["tv_bound"] is None else f"{r['tv_bound']:.2g}"])
    return _common.format_table(head, out, markdown=markdown, align="lrrlrrrrrrrrr")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny model and context, seconds")
    ap.add_argument("--markdown", action="store_true", help="a GitHub Markdown table")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--steps", type=int, default=12, help="decode steps per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per method, in turns")
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--qk-scale", type=float, default=4.0,
                    help="factor on q_proj and k_proj weights of the peaked model")
    ap.add_argument("--models", nargs="+", default=["plain", "peaked"],
                    choices=["plain", "peaked"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--chunk", type=int, default=2048, help="prefill chunk (tokens)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.contexts, args.steps, args.repeats = [2048], 4, 1
        args.hidden, args.head_dim, args.chunk = 256, 64, 1024
    print("machine:", _common.machine_line())
    if torch is None:
        print(f"skipped: bench_decode needs torch and transformers ({_MISSING})")
        return []
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}")
    print(f"model: Llama layout, {args.layers} layers, hidden {args.hidden}, {args.heads} "
          f"query heads, {args.kv_heads} key/value heads of dim {args.head_dim}, float32; "
          f"eps = {args.eps}, {args.steps} decode steps, best of {args.repeats} runs")
    rows = []
    for label in args.models:
        model = build_model(args, 1.0 if label == "plain" else args.qk_scale)
        for n in args.contexts:
            t0 = time.perf_counter()
            rows.extend(measure(model, label, n, args))
            print(f"  {label} n={n}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(table(rows, args.markdown))
    return rows


if __name__ == "__main__":
    main()
