"""Native Top-k training (arXiv 2512.03494): dense vs Top-k training, evaluated under Top-k decoding.

The same small causal transformer (same initial weights, same batches) is trained twice on
multi-query associative recall: a sequence of ``pairs`` key-value token pairs followed by
``queries`` keys taken from them; at every query the model must output that key's value.
Once with dense softmax attention, once with exact Top-k attention
(:func:`topkattn.torch.topk_attention`, ratio ``--train-ratio`` of the keys each causal row
can see, backward through the kept set).

Both models are then evaluated on the same held-out sequences

* with dense attention and with Top-k attention in every layer at several ratios rho
  (Top-k decoding: each query row keeps ``ceil(rho * keys it sees)`` keys);
* with a simulated approximate retriever of precision p (:func:`simulated_selector`:
  a fraction p of the exact Top-k set, the rest drawn from outside it) at ``--sim-ratio``,
  reporting the precision actually measured;

and the mean entropy of each model's (dense) attention rows is measured, over all rows and
at the query rows of the last layer (the retrieval step). Accuracy is over query positions.

Claims tested (arXiv 2512.03494): training with Top-k (train/inference consistency) gives better
accuracy under Top-k decoding than dense training, and Top-k training lowers the attention
entropy. Every number is the mean over ``--seeds`` runs, with the range across them. Runs on
CPU (one torch thread): about 6 minutes by default, under 1 minute with ``--quick``.

    python benchmarks/exp_native_topk.py [--quick] [--seeds 0 1] [--steps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except ImportError:
    sys.exit("this experiment needs PyTorch: pip install torch")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, machine_line  # noqa: E402

import topkattn.torch as tkt  # noqa: E402


# ----------------------------------------------------------------- task

def recall_batch(batch, pairs, queries, n_keys, n_values, gen):
    """Multi-query associative recall, one key-value pair per position.

    Position ``i < pairs`` holds the pair ``(k_i, v_i)`` (P distinct keys out of
    ``n_keys``, random values out of ``n_values``); the last ``queries`` positions hold a key
    taken from the pairs (distinct, random order) and the blank value ``n_values``. The
    target at a query position is that key's value; every other position is ignored (-100).

    Returns ``keys``, ``values`` (both ``(batch, pairs + queries)`` int64) and ``target``.
    """
    keys = torch.argsort(torch.rand(batch, n_keys, generator=gen), dim=1)[:, :pairs]
    vals = torch.randint(n_values, (batch, pairs), generator=gen)
    which = torch.argsort(torch.rand(batch, pairs, generator=gen), dim=1)[:, :queries]
    x_keys = torch.cat([keys, torch.gather(keys, 1, which)], dim=1)
    x_vals = torch.cat([vals, torch.full((batch, queries), n_values)], dim=1)
    y = torch.full_like(x_keys, -100)
    y[:, pairs:] = torch.gather(vals, 1, which)
    return x_keys, x_vals, y


# ----------------------------------------------------------------- model

class Attention(nn.Module):
    """Causal multi-head self-attention whose softmax is chosen by the model's ``mode``."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x, mode):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        kind = mode["kind"]
        if kind == "dense":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif kind == "topk":
            out = tkt.topk_attention(q, k, v, ratio=mode["ratio"], is_causal=True)
        elif kind == "sim":
            out = tkt.kept_set_attention(q, k, v, lambda s: _sim_select(s, mode), is_causal=True)
        else:
            raise ValueError(f"unknown attention mode {kind!r}")
        if mode.get("record") is not None:
            with torch.no_grad():
                mode["record"].append(tkt.attention_scores(q, k, is_causal=True))
        return self.proj(out.transpose(1, 2).reshape(B, L, D))


def _sim_select(scores, mode):
    """Simulated retriever of precision p at ratio rho; counts the hits for the report."""
    keep = tkt.simulated_selector(scores, mode["p"], ratio=mode["ratio"], generator=mode["gen"])
    exact = tkt.topk_select(scores, ratio=mode["ratio"])
    mode["hits"] += int((keep & exact).sum())
    mode["kept"] += int(exact.sum())
    return keep


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mode):
        x = x + self.attn(self.ln1(x), mode)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, n_keys, n_values, length, d=64, heads=4, layers=2):
        super().__init__()
        self.key_emb = nn.Embedding(n_keys, d)
        self.value_emb = nn.Embedding(n_values + 1, d)  # + the blank of query positions
        self.pos = nn.Embedding(length, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_values, bias=False)

    def forward(self, keys, values, mode):
        h = self.key_emb(keys) + self.value_emb(values) + self.pos(torch.arange(keys.shape[1]))
        for b in self.blocks:
            h = b(h, mode)
        return self.head(self.ln(h))


# ----------------------------------------------------------------- training and evaluation

def train(model, mode, args, seed, log_every):
    gen = torch.Generator().manual_seed(seed + 1)  # the same batches for every model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm)
        * 0.5 * (1 + math.cos(math.pi * min(1.0, t / args.steps))))
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        xk, xv, y = recall_batch(args.batch, args.pairs, args.queries, args.n_keys,
                                 args.n_values, gen)
        loss = F.cross_entropy(model(xk, xv, mode).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == args.steps:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f} s",
                  flush=True)
    model.eval()
    return time.perf_counter() - t0


@torch.no_grad()
def accuracy(model, data, mode):
    hit = tot = 0
    for xk, xv, y in data:
        pred = model(xk, xv, mode).argmax(-1)
        sel = y >= 0
        hit += int((pred[sel] == y[sel]).sum())
        tot += int(sel.sum())
    return hit / tot


@torch.no_grad()
def entropies(model, data, query_from, ratio):
    """Mean attention entropy (nats) of the model's dense forward pass: of the dense softmax
    rows and of the same scores restricted to their Top-k set at ``ratio`` (the distribution
    a Top-k layer would use), over all rows of all layers and heads and over the query rows
    of the last layer. Row 0 sees one key (entropy 0) and is left out."""
    import topkattn
    acc = {k: [] for k in ("dense all rows", "dense query rows", "topk all rows",
                           "topk query rows")}
    for xk, xv, _ in data:
        record = []
        model(xk, xv, {"kind": "dense", "record": record})
        for i, s in enumerate(record):
            kept = s.masked_fill(~tkt.topk_select(s, ratio=ratio), -math.inf)
            for kind, logits in (("dense", s), ("topk", kept)):
                h = topkattn.entropy(logits.numpy())  # (B, H, L), C core, float64
                acc[f"{kind} all rows"].append(h[..., 1:].ravel())
                if i == len(record) - 1:
                    acc[f"{kind} query rows"].append(h[..., query_from:].ravel())
    return {f"entropy {k}": float(np.mean(np.concatenate(v))) for k, v in acc.items()}


def evaluate(model, data, args, seed):
    res = {"dense": accuracy(model, data, {"kind": "dense"})}
    for rho in args.rhos:
        res[f"topk {rho:g}"] = accuracy(model, data, {"kind": "topk", "ratio": rho})
    for p in args.precisions:
        mode = {"kind": "sim", "ratio": args.sim_ratio, "p": p,
                "gen": torch.Generator().manual_seed(seed + 3), "hits": 0, "kept": 0}
        res[f"sim p={p:g}"] = accuracy(model, data, mode)
        res[f"measured p={p:g}"] = mode["hits"] / mode["kept"]
    res.update(entropies(model, data, args.pairs, args.train_ratio))
    return res


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter run (about 1 minute)")
    ap.add_argument("--seeds", type=int, nargs="+",
                    help="one run (initialisation, batches, evaluation set) per seed "
                         "(default 0 1; 0 with --quick)")
    ap.add_argument("--steps", type=int, help="training steps per model")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pairs", type=int, help="key-value pairs per sequence")
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--n-keys", type=int, help="key vocabulary (default 2 * pairs)")
    ap.add_argument("--n-values", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-ratio", type=float, default=0.1,
                    help="Top-k ratio used while training the Top-k model")
    ap.add_argument("--rhos", type=float, nargs="+", default=[0.5, 0.25, 0.1, 0.05, 0.02, 0.01])
    ap.add_argument("--sim-ratio", type=float, default=0.1,
                    help="ratio at which the simulated retriever is evaluated")
    ap.add_argument("--precisions", type=float, nargs="+", default=[1.0, 0.9, 0.7, 0.5])
    ap.add_argument("--eval-seqs", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: these small matrices run slower on "
                         "several threads of a busy machine)")
    ap.add_argument("--out", help="write native_topk.json here")
    args = ap.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else [0, 1]
    if args.steps is None:
        args.steps = 300 if args.quick else 600
    if args.pairs is None:
        args.pairs = 32 if args.quick else 64
    if args.n_keys is None:
        args.n_keys = 2 * args.pairs
    if not 1 <= args.queries <= args.pairs:
        ap.error("--queries must be in [1, --pairs] (each query is a distinct stored key)")
    if args.n_keys < args.pairs:
        ap.error("--n-keys must be at least --pairs (the keys of a sequence are distinct)")
    if args.quick:
        args.eval_seqs = min(args.eval_seqs, 256)
    return args


def run_seed(args, seed):
    """Train both models from one initialisation and evaluate them; {model: metrics}."""
    torch.manual_seed(seed)
    L = args.pairs + args.queries
    base = Transformer(args.n_keys, args.n_values, L, args.d_model, args.heads, args.layers)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    gen = torch.Generator().manual_seed(seed + 2)
    data = [recall_batch(64, args.pairs, args.queries, args.n_keys, args.n_values, gen)
            for _ in range(max(1, args.eval_seqs // 64))]
    results, times = {}, {}
    for name, mode in (("dense-trained", {"kind": "dense"}),
                       (f"topk-trained (rho={args.train_ratio:g})",
                        {"kind": "topk", "ratio": args.train_ratio})):
        print(f"seed {seed}: training {name}")
        model = Transformer(args.n_keys, args.n_values, L, args.d_model, args.heads,
                            args.layers)
        model.load_state_dict(init)
        times[name] = train(model, mode, args, seed, log_every=max(1, args.steps // 3))
        results[name] = evaluate(model, data, args, seed)
    return results, times, len(data) * 64


def _cell(vals):
    """Mean over seeds, with the range when there are several."""
    m = float(np.mean(vals))
    return f"{m:.3f}" if len(vals) == 1 else f"{m:.3f} [{min(vals):.3f}, {max(vals):.3f}]"


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    L = args.pairs + args.queries
    print(f"machine: {machine_line()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"task: {args.pairs} pairs + {args.queries} queries (L = {L}), {args.n_keys} keys, "
          f"{args.n_values} values (chance {1 / args.n_values:.3f}); model: {args.layers} "
          f"layers, d = {args.d_model}, {args.heads} heads; {args.steps} steps of "
          f"{args.batch}; seeds {args.seeds}")
    per_seed, times = [], {}
    for seed in args.seeds:
        res, t, n_eval = run_seed(args, seed)
        per_seed.append(res)
        for n, v in t.items():
            times[n] = times.get(n, 0.0) + v
    names = list(per_seed[0])
    keys = list(per_seed[0][names[0]])
    results = {n: {k: [r[n][k] for r in per_seed] for k in keys} for n in names}

    acc_rows = [k for k in keys if not k.startswith(("measured", "entropy"))]
    print(f"\naccuracy on {n_eval} held-out sequences per seed ({n_eval * args.queries} "
          f"queries); mean over seeds [min, max]; topk rho = Top-k decoding in every layer, "
          f"keeping ceil(rho * keys seen); sim = simulated retriever at rho = "
          f"{args.sim_ratio:g}")
    rows = []
    for k in acc_rows:
        meas = ""
        if k.startswith("sim"):
            p = k.split("=")[1]
            meas = " / ".join(f"{np.mean(results[n][f'measured p={p}']):.3f}" for n in names)
        rows.append([k] + [_cell(results[n][k]) for n in names] + [meas])
    print(format_table(["attention at inference"] + names + ["measured p"], rows))
    print()
    print(f"mean attention entropy (nats) of the dense forward pass: dense softmax rows, and "
          f"the same rows restricted to their Top-k set at rho = {args.train_ratio:g}")
    print(format_table(["entropy"] + names,
                       [[k[8:]] + [_cell(results[n][k]) for n in names]
                        for k in keys if k.startswith("entropy")]))
    print("\ntraining time (all seeds): " + ", ".join(f"{n} {t:.0f} s" for n, t in times.items()))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "native_topk.json"), "w") as f:
            json.dump({"args": vars(args), "results": results, "train_seconds": times}, f,
                      indent=2)
    return {n: {k: float(np.mean(v)) for k, v in results[n].items()} for n in names}


if __name__ == "__main__":
    main()
