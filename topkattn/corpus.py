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
import json
import numbers
import os
import re
import warnings

__all__ = ["MODULES", "paragraphs", "texts", "load"]

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


# ----------------------------------------------------------------- texts from a file

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")


def _text_value(value, where):
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {type(value).__name__}")
    return value.strip()


def load(path, field=None, column=None, count=None):
    """Texts from a file or a saved dataset, in their stored order, empty ones dropped.

    The format follows ``path``: a directory is a dataset saved by HuggingFace
    ``datasets`` (``Dataset.save_to_disk``; read with ``datasets.load_from_disk``, never
    downloaded); ``.jsonl``, ``.ndjson`` or ``.json`` is JSON Lines (one JSON object per
    line, its ``field``, or one JSON string per line); ``.parquet`` or ``.pq`` is a
    Parquet file (its ``column``, read with pyarrow); anything else is plain UTF-8 text,
    one text per line.

    Parameters
    ----------
    path : str or os.PathLike
    field : str, optional
        JSON Lines only: the key holding the text (default ``"text"``).
    column : str, optional
        Parquet and saved datasets only: the column holding the text (default
        ``"text"``).
    count : int, optional
        Keep the first ``count`` texts (default all).

    Returns
    -------
    list of str
        Non-empty texts with surrounding white space removed.

    Raises
    ------
    OSError
        The path does not exist, or it holds no non-empty text.
    ValueError
        ``field`` or ``column`` given for a format that does not take it, a missing key
        or column, a value that is not a string, or a line that is not JSON.
    ImportError
        Parquet without pyarrow, or a saved dataset without ``datasets``.

    Examples
    --------
    >>> import os, tempfile
    >>> from topkattn import corpus
    >>> p = os.path.join(tempfile.mkdtemp(), "t.jsonl")
    >>> with open(p, "w") as f:
    ...     _ = f.write('{"text": "One text."}\\n{"text": "Another one."}\\n')
    >>> corpus.load(p)
    ['One text.', 'Another one.']
    """
    path = os.fspath(path)
    if count is not None and (isinstance(count, bool) or not isinstance(count, numbers.Integral)
                              or count < 1):
        raise ValueError(f"count must be an integer >= 1, got {count!r}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    lower = path.lower()
    if os.path.isdir(path):
        kind = "dataset"
    elif lower.endswith(_JSONL_SUFFIXES):
        kind = "jsonl"
    elif lower.endswith(_PARQUET_SUFFIXES):
        kind = "parquet"
    else:
        kind = "lines"
    if field is not None and kind != "jsonl":
        raise ValueError(f"field applies to JSON Lines files (.jsonl, .ndjson, .json) only; "
                         f"{path} is read as {kind}")
    if column is not None and kind not in ("parquet", "dataset"):
        raise ValueError(f"column applies to Parquet files and saved datasets only; "
                         f"{path} is read as {kind}")
    if kind == "lines":
        with open(path, encoding="utf-8") as f:
            out = [ln.strip() for ln in f]
    elif kind == "jsonl":
        key = "text" if field is None else field
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
                if isinstance(rec, dict):
                    if key not in rec:
                        raise ValueError(f"{path}:{lineno}: no field {key!r}")
                    rec = rec[key]
                out.append(_text_value(rec, f"{path}:{lineno}"))
    elif kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError("reading Parquet needs pyarrow: pip install 'topkattn[dist]'"
                              ) from None
        key = "text" if column is None else column
        names = pq.read_schema(path).names
        if key not in names:
            raise ValueError(f"{path}: no column {key!r} (columns: {', '.join(names)})")
        values = pq.read_table(path, columns=[key]).column(key).to_pylist()
        out = [_text_value(v, f"{path}: column {key!r}") for v in values]
    else:
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{path} is a directory, read as a dataset saved by "
                              "HuggingFace datasets, which is not installed: "
                              "pip install datasets") from None
        key = "text" if column is None else column
        data = datasets.load_from_disk(path)
        if isinstance(data, datasets.DatasetDict):
            if len(data) != 1:
                raise ValueError(f"{path} holds the splits {', '.join(data)}; give the "
                                 "directory of one split")
            data = next(iter(data.values()))
        if key not in data.column_names:
            raise ValueError(f"{path}: no column {key!r} (columns: "
                             f"{', '.join(data.column_names)})")
        out = [_text_value(v, f"{path}: column {key!r}") for v in data[key]]
    out = [t for t in out if t]
    if count is not None:
        out = out[:count]
    if not out:
        raise OSError(f"{path}: no non-empty texts")
    return out
