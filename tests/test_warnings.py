"""The warning policy: our own code triggers no deprecation of the libraries it calls.

The suite turns every warning into an error except third-party deprecations
(``DeprecationWarning``, ``PendingDeprecationWarning``, ``FutureWarning``), which are shown
but not fatal (``filterwarnings`` in ``pyproject.toml``): a new release of transformers or
torch must not turn the suite red overnight. This file is the other half: it runs the
library's model-facing entry points with every warning recorded, and fails on any
deprecation that *our* code triggered.

Which code triggered a warning is decided from the stack at the moment it is raised: walking
outwards from the ``warnings.warn`` call, frames of the package that raised it and of torch's
module-call machinery are skipped; the first frame left is the caller that used the
deprecated API. A warning is ours when that frame lies in ``topkattn/`` or ``tests/``.
A deprecation that a library raises about its own internals (transformers calling a torch
API that torch deprecates, say) is blamed on that library and only shown.
"""
import inspect
import os
import sys
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import topkattn  # noqa: E402
from topkattn import hf, sweep  # noqa: E402

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
OURS = (Path(topkattn.__file__).resolve().parent, Path(__file__).resolve().parent)
# torch's nn.Module call dispatch sits between any caller and a model's forward
CALL_MACHINERY = (str(Path(torch.nn.Module.__call__.__code__.co_filename).resolve()),)


def _package_of(filename):
    """Top-level package name of a source file on sys.path, or the file itself."""
    path = Path(filename).resolve()
    for root in sorted((Path(p).resolve() for p in sys.path if p), key=lambda p: -len(p.parts)):
        try:
            rel = path.relative_to(root)
        except ValueError:
            continue
        return rel.parts[0].removesuffix(".py")
    return str(path)


def blamed_frame(stack):
    """The frame that used the deprecated API: see the module docstring.

    ``stack`` is a ``traceback.StackSummary`` taken inside ``warnings.showwarning``, so its
    innermost entries are the warnings machinery itself, then the raising code.
    """
    frames = list(stack)[:-1]                     # drop the recording function itself
    while frames and Path(frames[-1].filename).name == "warnings.py":
        frames.pop()
    frames = [f for f in frames if not f.filename.startswith("<")]
    if not frames:
        return None
    origin = _package_of(frames[-1].filename)
    for f in reversed(frames):
        if _package_of(f.filename) == origin or str(Path(f.filename).resolve()) in CALL_MACHINERY:
            continue
        return f
    return frames[-1]


def is_ours(frame):
    path = Path(frame.filename).resolve()
    return any(path.is_relative_to(root) for root in OURS)


class DeprecationRecorder:
    """Records every deprecation raised inside the ``with`` block, with its blamed frame."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("always")
        self.records = []

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DEPRECATIONS):
                frame = blamed_frame(traceback.extract_stack())
                self.records.append((category, str(message), frame))

        warnings.showwarning = show
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def ours(self):
        return [r for r in self.records if r[2] is not None and is_ours(r[2])]


def _report(records):
    return "\n".join(f"{c.__name__}: {m}\n    from {f.filename}:{f.lineno} {f.line}"
                     for c, m, f in records)


# ----------------------------------------------------------------- the classifier itself

def _deprecated_api():
    warnings.warn("old API", DeprecationWarning, stacklevel=2)


def test_recorder_blames_the_caller_of_a_deprecated_api():
    """A deprecation raised in another package is blamed on the frame that called it."""
    # a stand-in third-party function: same module-level code, compiled under another file
    ns = {"warnings": warnings}
    exec(compile(inspect.getsource(_deprecated_api), str(Path(np.__file__).parent / "x.py"),
                 "exec"), ns)
    with DeprecationRecorder() as rec:
        ns["_deprecated_api"]()                   # this line is the culprit
    assert len(rec.records) == 1
    (frame,) = [r[2] for r in rec.ours()]
    assert Path(frame.filename).resolve() == Path(__file__).resolve()


def test_recorder_catches_the_old_cache_keyword():
    """The transformers deprecation that once broke the suite is recognised as ours."""
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                  n_positions=32, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    if "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers has no `cache` keyword, so `past_key_values` is current")
    ids = torch.randint(2, 50, (1, 4))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True)["cache"]
        with DeprecationRecorder() as rec:
            model(input_ids=ids[:, :1], past_key_values=cache)
    assert any("past_key_values" in m for _, m, _ in rec.ours()), _report(rec.records)


# ----------------------------------------------------------------- the library's entry points

def test_hf_entry_points_trigger_no_deprecation():
    with DeprecationRecorder() as rec:
        model, tok = hf.load_model()
        enc = tok(["A short sentence.", "Another one, a little longer than the first."],
                  padding=True, return_tensors="pt")
        hf.capture(model, enc, layers=[0, 5], qkv=True)
        with hf.use_topk_attention(model, eps=1e-2, record=True) as record:
            with torch.no_grad():
                model(**enc)
        record.summary()
        with hf.use_topk_attention(model, k=4, layers=[1]):
            with torch.no_grad():
                model(**enc)
        hf.evaluate(model, tok, ["One text to evaluate."], eps=(1e-2,))
        sweep.run(source="bert", model=(model, tok), texts=["A text for the sweep."],
                  layers=[0], eps=(1e-2,), progress=False)
    assert not rec.ours(), _report(rec.ours())


@pytest.mark.skipif(not hasattr(transformers, "AttentionInterface"),
                    reason="decoder hooks need transformers with AttentionInterface")
def test_decoder_generation_triggers_no_deprecation():
    cfg = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=64, vocab_size=97,
                                   max_position_embeddings=64, pad_token_id=0,
                                   eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(2, 97, (2, 6))
    with DeprecationRecorder() as rec:
        for kwargs in (dict(eps=1e-2), dict(alpha=1.0, C=0.5, sink=1, recent=2),
                       dict(k=3, prefill="dense")):
            with hf.use_topk_attention(model, **kwargs):
                with torch.no_grad():
                    model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3,
                                   do_sample=False, pad_token_id=0)
    assert not rec.ours(), _report(rec.ours())
