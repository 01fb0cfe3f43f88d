"""topkattn.hf on tiny randomly initialised decoder-only models (GPT-2, Llama with
grouped-query attention, Qwen2): Top-k at every decode step against float64 references."""
import copy
import inspect
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from topkattn import hf  # noqa: E402

from _util import assert_as_close_as_stock  # noqa: E402

if not hasattr(transformers, "AttentionInterface"):
    pytest.skip("decoder hooks need transformers with AttentionInterface",
                allow_module_level=True)

VOCAB = 97


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                                  n_positions=64, pad_token_id=0, eos_token_id=1,
                                  bos_token_id=1)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _llama():   # 4 query heads sharing 2 key/value heads
    cfg = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64,
                                   vocab_size=VOCAB, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _qwen2():   # 4 query heads sharing 1 key/value head
    cfg = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=1, intermediate_size=64,
                                   vocab_size=VOCAB, max_position_embeddings=64,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


MODELS = {"gpt2": _gpt2, "llama": _llama, "qwen2": _qwen2}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    m = MODELS[request.param]()
    # larger query and key weights give logits of a spread like a trained model's (a few
    # units), so Top-k has something to cut
    with torch.no_grad():
        for att in hf.attention_layers(m):
            if hasattr(att, "q_proj"):
                att.q_proj.weight.mul_(15.0)
                att.k_proj.weight.mul_(15.0)
            else:                       # GPT-2: c_attn = [q | k | v] along the outputs
                att.c_attn.weight[:, :2 * att.embed_dim].mul_(15.0)
    return m


def _prompt(seed=0, length=9, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


def _generate(model, ids, mask=None, steps=6):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                              min_new_tokens=steps, do_sample=False, pad_token_id=0)


def _attn_modules(model):
    return hf.attention_layers(model)


# ----------------------------------------------------------------- stock equality

@pytest.mark.parametrize("select", [dict(eps=1e-300), dict(ratio=1.0), dict(alpha=100.0, C=1.0)])
def test_every_key_kept_equals_stock(model, select):
    ids = _prompt()
    generate = "eps" in select          # greedy generation once; forward passes for all
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        exact = copy.deepcopy(model).double()(input_ids=ids).logits
    with hf.use_topk_attention(model, record=True, **select) as rec:
        with torch.no_grad():
            out = model(input_ids=ids).logits
        gen = _generate(model, ids) if generate else None
    assert_as_close_as_stock(out, ref, exact)
    for layer in rec.layers:
        for k, n in zip(rec.k[layer], rec.n[layer]):
            np.testing.assert_array_equal(k, n)
    # causal rows: row i of a prefill sees i + 1 keys
    np.testing.assert_array_equal(rec.n[0][0][0, 0], np.arange(1, 10))
    if generate:
        assert torch.equal(gen, _generate(model, ids))
        # calls: the forward, generate's prefill, then 5 decode steps (6 new tokens);
        # decode step t (from 1) sees 9 + t keys
        assert [int(n[0, 0, 0]) for n in rec.n[0][2:]] == list(range(10, 15))
        assert rec.phase[0] == ["prefill", "prefill"] + ["decode"] * 5


def test_left_padding_rows_behave_as_stock(model):
    ids = _prompt(seed=3)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0                     # left padding: rows 0..3 of sequence 1 see no key
    ids[1, :4] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        exact = copy.deepcopy(model).double()(input_ids=ids, attention_mask=mask).logits
    with hf.use_topk_attention(model, eps=1e-300, record=True) as rec:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask).logits
        gen = _generate(model, ids, mask)
    assert_as_close_as_stock(out, ref, exact)
    assert torch.equal(gen, _generate(model, ids, mask))
    n0 = rec.n[0][0]
    assert (n0[1, :, :4] == 0).all() and np.isnan(rec.tau[0][0][1, :, :4]).all()
    np.testing.assert_array_equal(n0[1, 0, 4:], np.arange(1, 6))


def test_dense_prefill_is_the_stock_prefill(model):
    ids = _prompt(seed=1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    with hf.use_topk_attention(model, k=2, prefill="dense", record=True) as rec:
        with torch.no_grad():
            out = model(input_ids=ids).logits
        _generate(model, ids, steps=3)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert rec.phase[0] == ["decode"] * 2        # 3 new tokens = prefill + 2 decode steps
    assert all((k == 2).all() for k in rec.k[0])


# ----------------------------------------------------------------- one decode step vs float64

def _cache_name(model):
    """The keyword (and output field) this transformers version uses for the KV cache.

    Newer releases call it ``cache`` and deprecate ``past_key_values``; older ones know only
    ``past_key_values``. Decided from the forward's signature, not from a version string.
    """
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _decode_inputs(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    name = _cache_name(model)
    return {"input_ids": nxt, name: out[name]}


def _attn_output(model, inputs, layer, **hook_kwargs):
    """The hooked layer's attention output before the output projection: (B, Hq, 1, d)."""
    att = _attn_modules(model)[layer]
    proj = att.c_proj if hasattr(att, "c_proj") else att.o_proj
    got = {}
    h = proj.register_forward_pre_hook(lambda m, a: got.update(x=a[0].detach().clone()))
    try:
        with hf.use_topk_attention(model, layers=[layer], record=True, **hook_kwargs) as rec:
            with torch.no_grad():
                model(**copy.deepcopy(inputs))
    finally:
        h.remove()
    x = got["x"]
    B, L, _ = x.shape
    Hq = rec.k[layer][0].shape[1]
    return x.view(B, L, Hq, -1).transpose(1, 2).numpy().astype(np.float64), rec


def _reference(q, k, v, scale, choose):
    """Per head: kept set from choose(s) over the float64 logits, renormalised softmax."""
    B, Hq, _, d = q.shape
    g = Hq // k.shape[1]
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    kept = np.zeros((B, Hq), dtype=np.int64)
    taus = np.zeros((B, Hq))
    for b in range(B):
        for h in range(Hq):
            s = scale * (k[b, h // g] @ q[b, h, 0])
            keep = choose(s)
            p = np.exp(s - s.max())
            p /= p.sum()
            w = np.where(keep, p, 0.0)
            taus[b, h] = p[~keep].sum()
            out[b, h, 0] = (w / w.sum()) @ v[b, h // g]
            kept[b, h] = keep.sum()
    return out, kept, taus


def _top_set(s, eps, forced):
    """Forced keys plus the smallest top set of the others with total tail <= eps."""
    p = np.exp(s - s.max())
    p /= p.sum()
    order = [i for i in np.argsort(-s, kind="stable") if not forced[i]]
    keep = forced.copy()
    tail = p[~keep].sum()
    for i in order:
        if tail <= eps:
            break
        keep[i] = True
        tail -= p[i]
    return keep


@pytest.mark.parametrize("case", ["eps", "k_sink_recent", "eps_sink_recent", "dynamic"])
def test_decode_step_matches_float64_reference(model, case):
    ids = _prompt(seed=2, length=13)
    inputs = _decode_inputs(model, ids)
    layer = 1
    cap = hf.capture(model, copy.deepcopy(inputs), layers=[layer], qkv=True)
    q, k, v = (a[layer].astype(np.float64) for a in (cap.query, cap.key, cap.value))
    n = k.shape[2]
    att = _attn_modules(model)[layer]
    scale = float(getattr(att, "scaling", 1 / math.sqrt(q.shape[-1])))
    idx = np.arange(n)
    none = np.zeros(n, dtype=bool)
    if case == "eps":
        kw, eps = dict(eps=0.05), 0.05
        choose = lambda s: _top_set(s, eps, none)                        # noqa: E731
    elif case == "eps_sink_recent":
        kw, eps = dict(eps=0.05, sink=1, recent=2), 0.05
        choose = lambda s: _top_set(s, eps, (idx < 1) | (idx >= n - 2))  # noqa: E731
    elif case == "k_sink_recent":
        kw = dict(k=4, sink=1, recent=2)

        def choose(s):
            forced = (idx < 1) | (idx >= n - 2)
            rest = [i for i in np.argsort(-s, kind="stable") if not forced[i]][:1]
            keep = forced.copy()
            keep[rest] = True
            return keep
    else:
        kw = dict(alpha=1.0, C=0.5)
        kdyn = math.ceil(math.sqrt(n))
        choose = lambda s: np.isin(idx, np.argsort(-s, kind="stable")[:kdyn])  # noqa: E731
    want, kept, taus = _reference(q, k, v, scale, choose)
    got, rec = _attn_output(model, inputs, layer, **kw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    k_rec, tau_rec = rec.k[layer][0][:, :, 0], rec.tau[layer][0][:, :, 0]
    assert rec.phase[layer] == ["decode"]
    np.testing.assert_array_equal(rec.n[layer][0], n)
    assert np.mean(k_rec == kept) > 0.95            # float32 scores may reorder a near-tie
    np.testing.assert_allclose(tau_rec[k_rec == kept], taus[k_rec == kept], rtol=1e-3,
                               atol=1e-6)
    if "eps" in kw:
        assert (tau_rec <= kw["eps"] * (1 + 1e-9)).all()
    assert (k_rec < n).any()                        # something was cut
    s_all = scale * np.einsum("bhd,bhnd->bhn", q[:, :, 0],
                              np.repeat(k, q.shape[1] // k.shape[1], axis=1))
    p = np.exp(s_all - s_all.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(rec.entropy[layer][0][:, :, 0], ent, rtol=1e-4, atol=1e-6)


def test_capture_on_a_decoder_is_causal(model):
    ids = _prompt(seed=4, length=6, batch=1)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    cap = hf.capture(model, {"input_ids": ids})
    torch.testing.assert_close(cap.output.logits, ref, rtol=0, atol=0)
    x = cap.logits[0][0, 0]
    assert np.isneginf(x[np.triu_indices(6, 1)]).all()
    assert np.isfinite(x[np.tril_indices(6)]).all()


def test_decoder_needs_attention_interface(model, monkeypatch):
    monkeypatch.setattr(hf.interface, "uses_interface", lambda model, mods: False)
    with pytest.raises(ValueError, match="needs a transformers version .*AttentionInterface"):
        with hf.use_topk_attention(model, eps=0.1):
            pass
    assert not any(hasattr(m, "_topkattn_state") for m in _attn_modules(model))


def test_load_model_refuses_decoders(tmp_path):
    _gpt2().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loads BERT-architecture encoders.*'gpt2' decoder"):
        hf.load_model(str(tmp_path))


# ----------------------------------------------------------------- approximate selectors

def _decode_record(model, ids, steps=4, **kwargs):
    with hf.use_topk_attention(model, prefill="dense", record=True, **kwargs) as rec:
        gen = _generate(model, ids, steps=steps)
    return gen, rec


@pytest.mark.parametrize("approx", [dict(selector="simulated", precision=1.0),
                                    dict(selector="blocks", block_size=1)])
def test_perfect_approximate_selectors_are_exact(model, approx):
    # precision 1, or blocks of one key (whose bound is the key's own score), retrieve the
    # exact top set: same tokens, same k and tau, measured precision 1
    ids = _prompt(seed=5, length=24)
    gen, rec = _decode_record(model, ids, ratio=0.25)
    gen_a, rec_a = _decode_record(model, ids, ratio=0.25, **approx)
    assert torch.equal(gen, gen_a)
    for layer in rec.layers:
        for a, b, p in zip(rec.k[layer], rec_a.k[layer], rec_a.precision[layer]):
            np.testing.assert_array_equal(a, b)
            assert (p == 1.0).all()
        for a, b in zip(rec.tau[layer], rec_a.tau[layer]):
            # the exact path scores in the C core (float64 sums of float32 products), the
            # selectors from torch's float32 scores: tau agrees to float32 rounding
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-9)
    assert (rec_a.summary().mean_precision == 1.0).all()


def test_simulated_selector_precision_and_budget(model):
    # only the first decode step of layer 0 sees the same inputs in both runs (the prefill is
    # dense); later steps and layers follow what the selector changed
    ids = _prompt(seed=6, length=40, batch=2)
    _, rec = _decode_record(model, ids, ratio=0.25)
    _, rec_p = _decode_record(model, ids, ratio=0.25, selector="simulated", precision=0.5,
                              seed=3)
    prec = np.concatenate([p.ravel() for layer in rec_p.layers for p in rec_p.precision[layer]])
    assert 0.4 < prec.mean() < 0.6 and (prec <= 1).all() and (prec >= 0).all()
    for layer in rec.layers:   # the budget is the exact set's size at every step
        for k, n in zip(rec_p.k[layer], rec_p.n[layer]):
            np.testing.assert_array_equal(k, np.ceil(0.25 * n))
    # the exact set discards the least mass of any set of its size
    assert (rec_p.tau[0][0] >= rec.tau[0][0] * (1 - 1e-5) - 1e-9).all()
    # deterministic given the seed
    _, again = _decode_record(model, ids, ratio=0.25, selector="simulated", precision=0.5,
                              seed=3)
    for layer in rec_p.layers:
        for a, b in zip(rec_p.precision[layer], again.precision[layer]):
            np.testing.assert_array_equal(a, b)


def test_block_selector_reports_precision(model):
    ids = _prompt(seed=7, length=40)
    _, rec = _decode_record(model, ids, ratio=0.25)
    _, rec_b = _decode_record(model, ids, ratio=0.25, selector="blocks", block_size=8)
    for layer in rec_b.layers:
        for k, n, p in zip(rec_b.k[layer], rec_b.n[layer], rec_b.precision[layer]):
            np.testing.assert_array_equal(k, np.ceil(0.25 * n))
            assert ((p >= 0) & (p <= 1)).all()
    assert (rec_b.tau[0][0] >= rec.tau[0][0] * (1 - 1e-5) - 1e-9).all()
    assert rec.summary().mean_precision.isna().all()
    assert rec_b.summary().mean_precision.between(0, 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(selector="nearest"), "selector must be"),
    (dict(selector="simulated"), "needs precision"),
    (dict(selector="simulated", precision=1.5), "needs precision"),
    (dict(precision=0.5), "only used with selector='simulated'"),
    (dict(selector="blocks", block_size=0), "block_size must be"),
    (dict(selector="blocks", sink=2), "sink/recent keys are only supported"),
])
def test_bad_selector_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        with hf.use_topk_attention(model, ratio=0.5, **kwargs):
            pass
