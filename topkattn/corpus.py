"""A built-in corpus of real English text that needs no download.

The prose paragraphs of the docstrings of a fixed list of Python standard-library modules
and their public classes and functions: every Python installation has them. Paragraphs
that look like code, tables or lists are left out. The text depends on the Python version
(docstrings change between releases), not on anything else on the machine.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import numbers
import re
import warnings

__all__ = ["MODULES", "paragraphs", "texts"]

#: Standard-library modules whose docstrings make up the corpus, in this order.
MODULES = (
    "abc", "argparse", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs",
    "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum",
    "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob",
    "gzip", "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server",
    "imaplib", "inspect", "io", "ipaddress", "json", "locale", "logging", "mailbox",
    "mimetypes", "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle",
    "pkgutil", "platform", "poplib", "pprint", "queue", "random", "re", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver",
    "sqlite3", "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "types", "typing",
    "unittest", "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "zipfile",
)

_WS = re.compile(r"\s+")
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")


def _prose(par):
    """The paragraph as one line if it reads as English prose, else None."""
    lines = [ln.strip() for ln in par.strip().splitlines()]
    if not lines or any(ln.startswith((">>>", "...", "-", "*", "+", "|", "=", ":", "$", "#"))
                        for ln in lines):
        return None
    text = _WS.sub(" ", " ".join(lines)).strip()
    if "::" in text or "{" in text or "=" in text or "()" in text[:1]:
        return None
    if not text[:1].isupper() or not text.endswith("."):
        return None
    words = text.split()
    if len(words) < 8:
        return None
    letters = sum(c.isalpha() or c == " " for c in text)
    if letters < 0.88 * len(text):
        return None
    if len(_WORD.findall(text)) < 0.8 * len(words):
        return None
    return text


def _docstrings(module):
    yield inspect.getdoc(module) or ""
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        yield inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                if mname.startswith("_"):
                    continue
                meth = vars(obj)[mname]
                if inspect.isfunction(meth):
                    yield inspect.getdoc(meth) or ""


@functools.lru_cache(maxsize=1)
def _all_paragraphs():
    seen, out = set(), []
    for modname in MODULES:
        with warnings.catch_warnings():
            # reading some attributes warns (e.g. typing.io is deprecated); the text is
            # wanted, not the warning
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(modname)
            except ImportError:  # e.g. ssl or sqlite3 missing from a minimal build
                continue
            docs = list(_docstrings(module))
        for doc in docs:
            for par in re.split(r"\n\s*\n", doc):
                text = _prose(par)
                if text is not None and text not in seen:
                    seen.add(text)
                    out.append(text)
    return tuple(out)


def paragraphs():
    """Every prose paragraph of the corpus, in a fixed order.

    Returns
    -------
    list of str
        Paragraphs of at least 8 words, one line each, each ending with a full stop.

    Examples
    --------
    >>> from topkattn import corpus
    >>> len(corpus.paragraphs()) > 500
    True
    """
    return list(_all_paragraphs())


def texts(count=32, min_words=8, max_words=320):
    """``count`` texts whose lengths spread geometrically from ``min_words`` to ``max_words``.

    Text ``i`` joins consecutive corpus paragraphs (continuing where text ``i - 1`` stopped)
    until it has about ``min_words * (max_words / min_words) ** (i / (count - 1))`` words,
    and is cut at the last full stop within that length (or at the word count if there is
    none). ``max_words = 320`` gives about 400-500 WordPiece tokens, close to BERT's
    512-token limit; tokenize with ``truncation=True`` to stay within it.

    Parameters
    ----------
    count : int, >= 1
    min_words, max_words : int, 1 <= min_words <= max_words

    Returns
    -------
    list of str

    Examples
    --------
    >>> from topkattn import corpus
    >>> t = corpus.texts(4, min_words=10, max_words=80)
    >>> len(t), [len(s.split()) <= 80 for s in t]
    (4, [True, True, True, True])
    """
    for name, v in (("count", count), ("min_words", min_words), ("max_words", max_words)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an integer, got {v!r}")
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if min_words > max_words:
        raise ValueError(f"min_words must be <= max_words, got {min_words} > {max_words}")
    pars = _all_paragraphs()
    if not pars:
        raise RuntimeError("no prose docstrings found in the standard library (was Python "
                           "run with -OO, which strips docstrings?)")
    out, j = [], 0
    for i in range(count):
        frac = i / (count - 1) if count > 1 else 1.0
        target = max(1, round(min_words * (max_words / min_words) ** frac))
        words = []
        while len(words) < target:
            words.extend(pars[j % len(pars)].split())
            j += 1
        words = words[:target]
        cut = max((w for w in range(len(words)) if words[w].endswith(".")), default=-1)
        if cut + 1 >= min(target, max(min_words, target // 2)):
            words = words[:cut + 1]
        out.append(" ".join(words))
    return out
