"""The "bert" sweep source, `topkattn evaluate`, and the built-in corpus."""
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import numpy as np
import pytest

import topkattn
from topkattn import cli, corpus, sweep

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pd = pytest.importorskip("pandas")

from topkattn import hf  # noqa: E402

TEXTS = ["Return the number of items in a container.",
         "Split the pathname into a pair of head and tail, where tail is the last part."]


@pytest.fixture(scope="module")
def minilm():
    return hf.load_model()


@pytest.fixture(scope="module")
def small(minilm):
    return sweep.run(source="bert", eps=(0.1, 0.01), model=minilm, texts=TEXTS,
                     layers=[0, 5], progress=False)


def test_bert_rows_and_columns(small, minilm):
    tok = minilm[1]
    T = [len(tok(t)["input_ids"]) for t in TEXTS]
    assert list(small.columns) == list(sweep.BERT_COLUMNS)
    assert len(small) == sum(T) * 12 * 2 * 2
    first = small[small.text == 0]
    assert (first.n == T[0]).all()
    assert first[["layer", "head", "row", "eps"]].iloc[:3].values.tolist() == \
        [[0, 0, 0, 0.1], [0, 0, 0, 0.01], [0, 0, 1, 0.1]]
    assert set(small.layer) == {0, 5}


def test_bert_rows_match_captured_logits(small, minilm):
    model, tok = minilm
    cap = hf.capture(model, tok(TEXTS[1:], return_tensors="pt"), layers=[5])
    x = cap.logits[5][0].astype(np.float64)            # (H, T, T)
    s = np.sort(x, axis=-1)[..., ::-1]
    p = np.exp(s - s[..., :1])
    p /= p.sum(-1, keepdims=True)
    tail = 1.0 - np.cumsum(p, -1)
    got = small[(small.text == 1) & (small.layer == 5)]
    for eps in (0.1, 0.01):
        g = got[got.eps == eps].sort_values(["head", "row"])
        want = (tail > eps).sum(-1) + 1
        assert np.mean(g.k_eps.to_numpy() == want.ravel()) > 0.99
        np.testing.assert_allclose(g.sigma_fit, np.std(x, axis=-1, ddof=1).ravel(), rtol=1e-6)
    np.testing.assert_array_equal(got.rho, got.k_eps / got.n)


def test_bert_bounds_and_rules(small):
    assert (small.tau_at_k <= small.eps).all()
    assert (small.gap_bound_at_k >= small.tau_at_k).all()
    assert (small.multigap_bound_at_k >= small.tau_at_k).all()
    n = small.n.to_numpy(dtype=float)
    np.testing.assert_array_equal(
        small.rho_rule, topkattn.gaussian_k_eps(n, small.sigma_fit, small.eps) / n)


def test_summarize(small):
    s = sweep.summarize(small)
    assert list(s.columns) == list(sweep.SUMMARY_COLUMNS)
    assert s[["layer", "eps"]].values.tolist() == [[0, 0.1], [0, 0.01], [5, 0.1], [5, 0.01]]
    g = small[(small.layer == 5) & (small.eps == 0.01)]
    row = s.iloc[3]
    assert row.rows == len(g) and row.rho_median == np.median(g.rho)
    assert (s.gap_ratio_median >= 1).all() and (s.multigap_ratio_median >= 1).all()
    with pytest.raises(ValueError, match="lacks the columns"):
        sweep.summarize(small.drop(columns="rho"))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(texts=[]), ValueError, "non-empty sequence"),
    (dict(texts="one text"), TypeError, "texts must be"),
    (dict(texts=["x"], max_length=4096), ValueError, "max_length must be <= 512"),
    (dict(texts=["x"], layers=[7]), ValueError, "layers must be in"),
    (dict(model=3), TypeError, "model must be None, a name or path"),
])
def test_bert_bad_arguments(minilm, kwargs, exc, match):
    kwargs.setdefault("model", minilm)
    with pytest.raises(exc, match=match):
        sweep.run(source="bert", progress=False, **kwargs)


def test_evaluate_command(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    out = tmp_path / "ev"
    assert cli.main(["evaluate", "--eps", "0.1", "0.001", "--text-file", str(texts),
                     "--layers", "0", "5", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    for word in ("kept_fraction", "hidden_drift", "cosine_mean", "mlm_top1_agreement"):
        assert word in stdout
    df = pd.read_csv(out / "evaluate.csv")
    assert df[["eps", "layer"]].values.tolist() == [[0.1, 0], [0.1, 5], [0.001, 0], [0.001, 5]]
    assert (df.tau_max <= df.eps).all()
    assert (df[df.eps == 0.001].kept_fraction.to_numpy() >
            df[df.eps == 0.1].kept_fraction.to_numpy()).all()
    with open(out / "evaluate.json", encoding="utf-8") as f:
        doc = json.load(f)
    assert doc["metadata"]["arguments"]["layers"] == [0, 5]
    models = doc["metadata"]["model_records"]
    assert [m["eps"] for m in models] == [0.1, 0.001]
    assert models[1]["cosine_min"] > models[0]["cosine_min"] > 0.9
    assert models[0]["mlm_top1_agreement"] is None      # a sentence model: no MLM head


def test_evaluate_missing_model(tmp_path, capsys):
    assert cli.main(["evaluate", "--model", str(tmp_path / "none"), "--out",
                     str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "topkattn evaluate: error:" in err and "not available locally" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------- corpus

def test_corpus_paragraphs_are_prose():
    pars = corpus.paragraphs()
    assert len(pars) > 500 and len(set(pars)) == len(pars)
    for p in pars:
        assert p[0].isupper() and p.endswith(".") and len(p.split()) >= 8
        assert ">>>" not in p and "\n" not in p
    assert corpus.paragraphs() == pars


def test_corpus_texts_lengths():
    t = corpus.texts(6, min_words=10, max_words=200)
    words = [len(s.split()) for s in t]
    assert len(t) == 6 and all(w <= 200 for w in words)
    assert words[-1] > 100 and words[0] <= 10
    assert corpus.texts(6, min_words=10, max_words=200) == t
    with pytest.raises(ValueError, match="min_words must be <= max_words"):
        corpus.texts(3, min_words=50, max_words=10)
    with pytest.raises(TypeError, match="count must be an integer"):
        corpus.texts(2.0)
    with pytest.raises(ValueError, match="count must be >= 1"):
        corpus.texts(0)
