"""topkattn.hf's certified selector on a tiny randomly initialised Llama-layout model with
grouped-query attention: decode steps through certified search on a growing key index,
against dense and exact Top-k generation and float64 references of the same rows."""
import copy
import inspect
import os

import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from topkattn import hf  # noqa: E402
from topkattn.hf import certified  # noqa: E402

if not hasattr(transformers, "AttentionInterface"):
    pytest.skip("decoder hooks need transformers with AttentionInterface",
                allow_module_level=True)

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    # 4 query heads sharing 2 key/value heads, head dim 16, 3 layers
    cfg = transformers.LlamaConfig(num_hidden_layers=3, hidden_size=64, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=128,
                                   vocab_size=VOCAB, max_position_embeddings=1024,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).eval()
    # larger query and key weights give logits a spread of several units, like a trained
    # model's, so the search has keys to skip
    with torch.no_grad():
        for att in hf.attention_layers(m):
            att.q_proj.weight.mul_(15.0)
            att.k_proj.weight.mul_(15.0)
    return m


def _prompt(seed=0, length=160, batch=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, length), generator=g)


def _generate(model, ids, mask=None, steps=6, scores=False):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps,
                             min_new_tokens=steps, do_sample=False, pad_token_id=0,
                             output_logits=scores, return_dict_in_generate=scores)
    return out


def _cache_name(model):
    """The keyword this transformers version uses for the KV cache (newer: ``cache``)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _layers(model):
    return list(range(len(hf.attention_layers(model))))


# ----------------------------------------------------------------- against dense and exact

def test_tokens_and_logits_match_dense_and_exact(model):
    ids = _prompt(batch=2)
    steps = 8
    dense = _generate(model, ids, steps=steps, scores=True)
    with hf.use_topk_attention(model, eps=1e-3, prefill="dense") as _:
        exact = _generate(model, ids, steps=steps, scores=True)
    with hf.use_topk_attention(model, eps=1e-3, prefill="dense", selector="certified",
                               record=True) as rec:
        cert = _generate(model, ids, steps=steps, scores=True)
    assert torch.equal(cert.sequences, dense.sequences)
    assert torch.equal(cert.sequences, exact.sequences)
    for sd, se, sc in zip(dense.logits, exact.logits, cert.logits):
        # both drop at most eps of each row's mass: the logits move by about as much
        scale = float(sd.abs().max())
        assert float((sc - sd).abs().max()) <= 0.05 * scale
        assert float((sc - se).abs().max()) <= 0.05 * scale
    # every decode step went through the certified search (on contexts this short a group
    # of queries is scored in full: the search's own rule for at most 1024 keys)
    for layer in _layers(model):
        assert rec.phase[layer] == ["decode"] * (steps - 1)
        for ks, n, tvb, k in zip(rec.keys_scored[layer], rec.n[layer], rec.tv_bound[layer],
                                 rec.k[layer]):
            assert ks.shape == n.shape == tvb.shape == (2, 4, 1)
            assert ((k >= 1) & (k <= ks) & (ks <= n)).all()
            assert (tvb <= 1e-3).all()
    frac = rec.summary().scored_fraction
    assert ((frac > 0) & (frac <= 1)).all()


def test_longer_contexts_skip_keys(model):
    # past 1024 keys the search samples before it decides: on this model's peaked logits the
    # certified rows score only part of the cache, and the tokens still match dense ones
    ids = _prompt(seed=3, length=3000)
    dense = _generate(model, ids, steps=3)
    with hf.use_topk_attention(model, eps=1e-2, prefill="dense", selector="certified",
                               record=True) as rec:
        cert = _generate(model, ids, steps=3)
    assert torch.equal(cert, dense)
    frac = rec.summary().scored_fraction
    assert ((frac > 0) & (frac <= 1)).all() and (frac < 0.9).any()


def test_every_row_is_certified_against_float64(model, monkeypatch):
    """Per row: the keys the index holds are the cache's keys, the kept set's true TV from
    full float64 scoring is <= tv_bound <= eps, and the output is the renormalised softmax
    over the kept set (float64 reference)."""
    seen = []
    real_attention, real_decode = certified.certified_attention, certified.decode

    def spy_attention(Q, index, V, eps, **kw):
        # one call per batch item: every key/value head's query group against its index
        out, info = real_attention(Q, index, V, eps, **kw)
        H = index._keys.shape[0]
        assert Q.shape[0] == V.shape[0] == H and index.batch_shape == (H,)
        for h in range(H):
            keys = np.empty((index.n, index.d), dtype=np.float64)
            keys[index._perm[h, :index.n]] = index._keys[h, :index.n]
            head = types.SimpleNamespace(indices=info.indices[h], k=info.k[h],
                                         tv_bound=info.tv_bound[h])
            seen[-1]["rows"].append((np.array(Q[h], np.float64), keys,
                                     np.array(V[h], np.float64), out[h].copy(), head,
                                     kw["scale"]))
        return out, info

    def spy_decode(layer, q, k, v, mask, scaling, eps, want):
        seen.append({"k": k.detach().numpy().astype(np.float64).copy(), "rows": []})
        return real_decode(layer, q, k, v, mask, scaling, eps, want)

    monkeypatch.setattr(certified, "certified_attention", spy_attention)
    monkeypatch.setattr(certified, "decode", spy_decode)
    monkeypatch.setattr(hf.hooked, "decode", spy_decode)
    eps = 1e-2
    with hf.use_topk_attention(model, eps=eps, selector="certified", record=True) as rec:
        _generate(model, _prompt(seed=1, length=300, batch=2), steps=5)
    assert len(seen) == 4 * len(_layers(model))         # 4 decode steps per layer
    checked = 0
    for call in seen:
        K_cache = call["k"]                             # (B, Hkv, n, d)
        assert len(call["rows"]) == K_cache.shape[0] * K_cache.shape[1]
        for j, (Q, keys, V, out, info, scale) in enumerate(call["rows"]):
            b, h = divmod(j, K_cache.shape[1])
            np.testing.assert_array_equal(keys, K_cache[b, h])   # the index is the cache
            for r in range(Q.shape[0]):
                s = scale * (keys @ Q[r])
                p = np.exp(s - s.max())
                p /= p.sum()
                kept = info.indices[r][info.indices[r] >= 0]
                assert len(kept) == info.k[r]
                dropped = np.ones(len(p), dtype=bool)
                dropped[kept] = False
                tv = p[dropped].sum()                   # TV(P, P_hat) = P(dropped)
                assert tv <= info.tv_bound[r] <= eps
                w = p[kept] / p[kept].sum()
                np.testing.assert_allclose(out[r], w @ V[kept], rtol=1e-5, atol=1e-6)
                # the output error is bounded by the certificate (docs/design.md §3)
                dense = p @ V
                span = V.max(0) - V.min(0)
                assert (np.abs(out[r] - dense) <= info.tv_bound[r] * span + 1e-5).all()
                checked += 1
    assert checked == len(seen) * 2 * 4
    # the record's tau is the true discarded mass of the kept set, under the certificate
    for layer in _layers(model):
        assert rec.phase[layer] == ["prefill"] + ["decode"] * 4
        assert rec.tv_bound[layer][0] is None            # an exact Top-k prefill
        for tau, tvb in zip(rec.tau[layer][1:], rec.tv_bound[layer][1:]):
            assert (tau <= tvb).all()


# ----------------------------------------------------------------- the index grows

def test_index_is_built_once_and_grows_by_one_key_per_step(model):
    ids = _prompt(seed=2, length=100, batch=2)
    steps = 7
    with hf.use_topk_attention(model, eps=1e-2, selector="certified", record=True) as rec:
        _generate(model, ids, steps=steps)
        states = [getattr(m, "_topkattn_state").certified for m in hf.attention_layers(model)]
        sizes = [[(ix.batch_shape, ix.n) for ix in st.indexes] for st in states]
    for layer in _layers(model):
        assert rec.index_builds[layer] == 1             # built at the first decode step
        assert rec.index_appends[layer] == steps - 2    # then one append per step
        # decode step t (from 1) sees 100 + t keys
        assert [int(n[0, 0, 0]) for n in rec.n[layer][1:]] == list(range(101, 100 + steps))
        # one index per sequence, over its 2 key/value heads
        assert sizes[layer] == [((2,), 100 + steps - 1)] * 2


def test_a_new_generate_call_gives_a_fresh_models_result(model):
    a = _prompt(seed=3, length=120)
    b = a.clone()
    b[0, 5] = (b[0, 5] + 1) % (VOCAB - 2) + 2           # differs in one early token only
    c = _prompt(seed=4, length=90, batch=2)             # shorter, another batch size
    d = _prompt(seed=5, length=140)                     # longer
    kw = dict(eps=1e-2, selector="certified", prefill="dense")
    fresh = {}
    for name, ids in (("b", b), ("c", c), ("d", d)):
        with hf.use_topk_attention(model, **kw):
            fresh[name] = _generate(model, ids, scores=True)
    with hf.use_topk_attention(model, record=True, **kw) as rec:
        _generate(model, a)
        got = {name: _generate(model, ids, scores=True)
               for name, ids in (("b", b), ("c", c), ("d", d))}
    for name in fresh:
        assert torch.equal(got[name].sequences, fresh[name].sequences)
        for x, y in zip(got[name].logits, fresh[name].logits):
            torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert all(rec.index_builds[layer] == 4 for layer in _layers(model))


def _prefill(model, ids):
    name = _cache_name(model)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    return out[name], out.logits[:, -1:].argmax(-1)


def _step(model, tok, cache):
    with torch.no_grad():
        out = model(input_ids=tok, **{_cache_name(model): cache})
    return out.logits, out[_cache_name(model)]


def test_another_cache_of_the_same_length_is_not_taken_for_the_continuation(model):
    # decode steps fed by hand: a second cache, built outside the block, exactly as long as
    # the index, whose last key the first layer computed from the same token at the same
    # position in a one-token step too (so that key is bit for bit the one indexed)
    a = _prompt(seed=6, length=80)
    cache_a, tok_a = _prefill(model, a)
    probe, _ = _step(model, tok_a, copy.deepcopy(cache_a))
    tok_a2 = probe[:, -1:].argmax(-1)
    b = _prompt(seed=7, length=81)
    cache_b, _ = _prefill(model, b)
    _, cache_b = _step(model, tok_a2, cache_b)                         # 82 keys
    tok_b = (tok_a2 + 5) % (VOCAB - 2) + 2
    cache_b_fresh = copy.deepcopy(cache_b)
    with hf.use_topk_attention(model, eps=1e-2, selector="certified", record=True) as rec:
        logits, cache_a = _step(model, tok_a, cache_a)                 # index: 81 keys
        assert torch.equal(logits[:, -1:].argmax(-1), tok_a2)
        _, cache_a = _step(model, tok_a2, cache_a)                     # 82 keys
        got, _ = _step(model, tok_b, cache_b)                          # another cache: 83
    assert all(rec.index_builds[layer] == 2 for layer in _layers(model))
    with hf.use_topk_attention(model, eps=1e-2, selector="certified"):
        want, _ = _step(model, tok_b, cache_b_fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_cropped_cache_is_reindexed(model):
    a = _prompt(seed=11, length=90)
    cache, tok = _prefill(model, a)
    with hf.use_topk_attention(model, eps=1e-2, selector="certified", record=True) as rec:
        for _ in range(4):                                             # 91 .. 94 keys
            logits, cache = _step(model, tok, cache)
            tok = logits[:, -1:].argmax(-1)
        cache.crop(-2)                                                 # 92 keys
        other = (tok + 1) % (VOCAB - 2) + 2
        fresh = copy.deepcopy(cache)
        got, _ = _step(model, other, cache)                            # 93 keys again
    assert all(rec.index_builds[layer] == 2 for layer in _layers(model))
    with hf.use_topk_attention(model, eps=1e-2, selector="certified"):
        want, _ = _step(model, other, fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ----------------------------------------------------------------- masks and caches

def test_left_padding_is_honoured(model):
    ids = _prompt(seed=8, length=120, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :30] = 0
    ids[1, :30] = 0
    with hf.use_topk_attention(model, eps=1e-4, prefill="dense") as _:
        exact = _generate(model, ids, mask, scores=True)
    with hf.use_topk_attention(model, eps=1e-4, prefill="dense", selector="certified",
                               record=True) as rec:
        cert = _generate(model, ids, mask, scores=True)
    assert torch.equal(cert.sequences, exact.sequences)
    # the padded sequence's rows see 30 keys fewer
    n = rec.n[0][0]
    assert (n[0] == 121).all() and (n[1] == 91).all()
    # the padded sequence alone (no padding) gives the same tokens
    with hf.use_topk_attention(model, eps=1e-4, prefill="dense", selector="certified"):
        alone = _generate(model, ids[1:, 30:])
    assert torch.equal(alone[0, 90:], cert.sequences[1, 120:])


def test_a_static_cache_is_supported(model):
    ids = _prompt(seed=9, length=100)
    steps = 5
    static = transformers.StaticCache(config=model.config, max_cache_len=100 + steps + 3)
    with hf.use_topk_attention(model, eps=1e-4, prefill="dense") as _:
        exact = _generate(model, ids, steps=steps)
    with hf.use_topk_attention(model, eps=1e-4, prefill="dense", selector="certified",
                               record=True) as rec:
        with torch.no_grad():
            cert = model.generate(input_ids=ids, max_new_tokens=steps, min_new_tokens=steps,
                                  do_sample=False, pad_token_id=0,
                                  **{_cache_name(model): static})
    assert torch.equal(cert, exact)
    assert [int(n[0, 0, 0]) for n in rec.n[0]] == list(range(101, 100 + steps))
    assert rec.index_builds[0] == 1


def test_a_mask_with_a_hole_is_refused(model):
    ids = _prompt(seed=10, length=40)
    mask = torch.ones_like(ids)
    mask[0, 10] = 0                                     # a hidden key in the middle
    with hf.use_topk_attention(model, eps=1e-2, selector="certified"):
        with pytest.raises(ValueError, match="attention_mask must leave each sequence one "
                                             "contiguous"):
            _generate(model, ids, mask, steps=3)


def test_ranges_refuse_biases_and_head_dependent_masks():
    s = certified.Session(64)
    bias = torch.zeros(1, 1, 1, 8)
    bias[..., 3] = -2.0
    with pytest.raises(ValueError, match="attention_mask adds finite non-zero values"):
        s.ranges(bias, 1, 8)
    per_head = torch.ones(1, 2, 1, 8, dtype=torch.bool)
    per_head[0, 1, 0, 0] = False
    with pytest.raises(ValueError, match="attention_mask differs between heads"):
        s.ranges(per_head, 1, 8)
    m = torch.zeros(2, 1, 1, 8)
    m[1, ..., :3] = float("-inf")
    m[0, ..., 6:] = torch.finfo(torch.float32).min
    lo, hi = s.ranges(m, 2, 8)
    assert lo.tolist() == [0, 3] and hi.tolist() == [6, 8]


# ----------------------------------------------------------------- arguments

@pytest.mark.parametrize("kwargs, match", [
    (dict(k=4), "selector='certified' takes eps only .*got k=4"),
    (dict(ratio=0.5), "selector='certified' takes eps only .*got ratio=0.5"),
    (dict(alpha=1.0, C=0.5), "selector='certified' takes eps only .*got alpha=1.0"),
    (dict(eps=0.1, sink=1), "sink/recent keys are only supported"),
    (dict(eps=0.1, block_size=0), "block_size must be"),
])
def test_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        with hf.use_topk_attention(model, selector="certified", **kwargs):
            pass
    assert not any(hasattr(m, "_topkattn_state") for m in hf.attention_layers(model))
    assert all(not m._forward_pre_hooks for m in hf.attention_layers(model))


def test_encoders_are_refused():
    cfg = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=VOCAB)
    bert = transformers.BertModel(cfg).eval()
    with pytest.raises(ValueError, match="selector='certified' runs the decode steps of "
                                         "decoder-only models"):
        with hf.use_topk_attention(bert, eps=0.1, selector="certified"):
            pass


def test_hooks_are_removed_on_exit(model):
    with pytest.raises(RuntimeError, match="boom"):
        with hf.use_topk_attention(model, eps=0.1, selector="certified"):
            assert all(m._forward_pre_hooks for m in hf.attention_layers(model))
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks for m in hf.attention_layers(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32, torch.float64])
def test_additive_mask_matches_torch_and_leaves_the_mask_alone(dtype, mask_dtype):
    # the hooked path converts float32/float64 masks in NumPy: same values as torch's way
    g = torch.Generator().manual_seed(1)
    hide = torch.rand(2, 1, 3, 40, generator=g) > 0.4
    if mask_dtype == torch.bool:
        mask = ~hide
        want = torch.zeros(mask.shape, dtype=dtype).masked_fill(hide, float("-inf"))
    else:
        mask = torch.randn(2, 1, 3, 40, generator=g, dtype=mask_dtype)
        mask[hide] = torch.finfo(mask_dtype).min
        mask[0, 0, 0, 0] = float("-inf")
        m = mask.to(dtype)
        want = m.masked_fill(m <= torch.finfo(dtype).min, float("-inf"))
    before = mask.clone()
    got = hf.hooked._additive_mask(torch, mask, dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(mask, before)


@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_other_decoder_layouts(arch):
    # GPT-2 (multi-head, a fused c_attn) and Qwen2 (4 query heads sharing 1 key/value head)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                                      n_positions=256, pad_token_id=0, eos_token_id=1,
                                      bos_token_id=1)
        torch.manual_seed(0)
        m = transformers.GPT2LMHeadModel(cfg).eval()
    else:
        cfg = transformers.Qwen2Config(num_hidden_layers=2, hidden_size=32,
                                       num_attention_heads=4, num_key_value_heads=1,
                                       intermediate_size=64, vocab_size=VOCAB,
                                       max_position_embeddings=256, pad_token_id=0,
                                       eos_token_id=1, bos_token_id=1)
        torch.manual_seed(0)
        m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for att in hf.attention_layers(m):
            if hasattr(att, "q_proj"):
                att.q_proj.weight.mul_(15.0)
                att.k_proj.weight.mul_(15.0)
            else:
                att.c_attn.weight[:, :2 * att.embed_dim].mul_(15.0)
    ids = _prompt(seed=12, length=120, batch=2)
    with hf.use_topk_attention(m, eps=1e-4, prefill="dense"):
        exact = _generate(m, ids, steps=5)
    with hf.use_topk_attention(m, eps=1e-4, prefill="dense", selector="certified",
                               record=True) as rec:
        cert = _generate(m, ids, steps=5)
        shapes = [[ix.batch_shape for ix in getattr(a, "_topkattn_state").certified.indexes]
                  for a in hf.attention_layers(m)]
    assert torch.equal(cert, exact)
    hkv = 1 if arch == "qwen2" else 4
    assert shapes == [[(hkv,), (hkv,)]] * 2        # one index per sequence over its kv heads
    for layer in rec.layers:
        assert rec.index_builds[layer] == 1 and rec.index_appends[layer] == 3
        for ks, n in zip(rec.keys_scored[layer], rec.n[layer]):
            assert ks.shape == (2, 4, 1) and (ks <= n).all()


def test_a_failed_step_leaves_no_half_updated_index(model):
    # a non-finite key of the second key/value head: the step's keys are refused (by the
    # sequence's index, for every head); retried on the same cache object, the layer
    # must rebuild rather than trust indexes the failed step may have touched
    a = _prompt(seed=13, length=70)
    cache, tok = _prefill(model, a)
    fresh = copy.deepcopy(cache)
    layer0 = hf.attention_layers(model)[0]
    head_dim = layer0.head_dim
    with hf.use_topk_attention(model, eps=1e-2, selector="certified", record=True) as rec:
        logits, cache = _step(model, tok, cache)                       # build: 71 keys
        tok2 = logits[:, -1:].argmax(-1)
        h = layer0.k_proj.register_forward_hook(
            lambda mod, args, out: out.index_fill(-1, torch.tensor([head_dim + 3]),
                                                  float("nan")))
        try:
            with pytest.raises(ValueError, match="new_keys contains NaN or inf"):
                _step(model, tok2, cache)
        finally:
            h.remove()
        first = cache.layers[0]            # take the failed step's key back out of layer 0
        first.keys, first.values = first.keys[:, :, :-1], first.values[:, :, :-1]
        got, _ = _step(model, tok2, cache)                             # 72 keys again
    assert rec.index_builds[0] == 2 and rec.index_builds[1] == 1
    with hf.use_topk_attention(model, eps=1e-2, selector="certified"):
        _, fresh = _step(model, tok, fresh)
        want, _ = _step(model, tok2, fresh)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
