"""Distributed, resumable "bert" sweeps: Dask workers, the Parquet dataset, the manifest,
killed workers, interrupted and resumed runs, and texts from files."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import numpy as np
import pytest

import topkattn
from topkattn import _sweepstore, cli, corpus, sweep

pd = pytest.importorskip("pandas")
pytest.importorskip("torch")
pytest.importorskip("transformers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
distributed = pytest.importorskip("distributed")
psutil = pytest.importorskip("psutil")

from topkattn import hf  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(topkattn.__file__)))

# 5 texts, one per task: several tasks of very different lengths, a few thousand rows
SMALL = dict(eps=(0.1, 0.01), texts=5, layers=[0, 5], max_length=40, batch_size=1,
             task_size=1, progress=False)
CLI_SMALL = ["--texts", "5", "--layers", "0", "5", "--eps", "0.1", "0.01", "--max-length",
             "40", "--batch-size", "1", "--task-size", "1", "--quiet", "--no-plots"]


@pytest.fixture(scope="module")
def minilm():
    return hf.load_model()


@pytest.fixture(scope="module")
def reference(minilm):
    """The in-process sweep, rows kept in memory."""
    return sweep.run(source="bert", model=minilm, **SMALL)


def _cluster(n):
    """A LocalCluster of n worker processes (1 thread each) and its client; on exit both
    are closed and the worker processes are gone."""
    cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                       dashboard_address=":0")
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        pids = set(client.run(os.getpid).values())
        client.close()
        cluster.close()
        deadline = time.monotonic() + 30
        while any(psutil.pid_exists(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(psutil.pid_exists(p) for p in pids), "worker processes left behind"


@pytest.fixture(scope="module")
def client2():
    yield from _cluster(2)


def _files(root):
    out = []
    for dirpath, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(dirpath, n), root) for n in names]
    return sorted(out)


def _check_dataset(path, reference):
    data = sweep.open_dataset(path)
    assert data.complete and data.rows == len(reference)
    pd.testing.assert_frame_equal(data.to_pandas(), reference, check_exact=True)
    manifest = []
    with open(os.path.join(path, "_manifest.jsonl"), encoding="utf-8") as f:
        for ln in f:
            try:
                manifest.append(json.loads(ln))
            except json.JSONDecodeError:   # only a torn record may be left
                assert not ln.endswith("}\n")
    tasks = [r["task"] for r in manifest]
    assert sorted(tasks) == list(range(data.config["tasks"]))   # each task exactly once
    parts = [f for f in _files(path) if f.endswith(".parquet")]
    assert len(parts) == data.config["tasks"] * len(data.config["layers"])
    assert not [f for f in _files(path) if f.endswith(".tmp")]
    return data, manifest


# ----------------------------------------------------------------- same results everywhere

def test_dataset_equals_in_memory_rows(reference, minilm, tmp_path):
    data = sweep.run(source="bert", model=minilm, out=tmp_path / "d", **SMALL)
    assert isinstance(data, sweep.SweepDataset)
    _check_dataset(tmp_path / "d", reference)
    assert sorted(os.listdir(tmp_path / "d")) == ["_manifest.jsonl", "_run.json", "layer=0",
                                                   "layer=5"]
    # one row group per eps in every file, with statistics that let a reader skip it
    f = pq.ParquetFile(tmp_path / "d" / "layer=5" / "part-00004.parquet")
    assert f.metadata.num_row_groups == 2
    for g, e in enumerate(SMALL["eps"]):
        st = f.metadata.row_group(g).column(f.schema_arrow.names.index("eps")).statistics
        assert st.min == st.max == e
    # summary and partial reads from the dataset equal those of the DataFrame
    pd.testing.assert_frame_equal(sweep.summarize(data), sweep.summarize(reference),
                                  check_exact=True)
    pd.testing.assert_frame_equal(sweep.summarize(str(tmp_path / "d")),
                                  sweep.summarize(reference), check_exact=True)
    part = data.to_pandas(layers=5, eps=[0.01])
    want = reference[(reference.layer == 5) & (reference.eps == 0.01)]
    pd.testing.assert_frame_equal(part, want.reset_index(drop=True), check_exact=True)
    bins = np.linspace(0, 1, 41)
    for e, (counts, median) in data.rho_histograms(bins).items():
        rho = reference.loc[reference.eps == e, "rho"].to_numpy()
        np.testing.assert_array_equal(counts, np.histogram(rho, bins=bins)[0])
        assert median == np.median(rho)
    meta = data.metadata
    assert meta["versions"]["topkattn"] == topkattn.__version__
    assert meta["versions"]["pyarrow"] == pa.__version__
    assert meta["sessions"][0]["status"] == "complete" and meta["elapsed_s"] > 0
    assert meta["config"]["expected_rows"] == len(reference)


def test_two_workers_give_the_same_rows(reference, client2, tmp_path):
    """In-process vs 2 workers here; vs 1 worker in test_cli_one_worker."""
    two = sweep.run(source="bert", client=client2, **SMALL)
    pd.testing.assert_frame_equal(two, reference, check_exact=True)
    sweep.run(source="bert", client=client2, out=tmp_path / "two", **SMALL)
    data, _ = _check_dataset(tmp_path / "two", reference)
    assert data.metadata["sessions"][0]["workers"].startswith("2 workers at tcp://")


def test_rows_per_head_sampling_is_deterministic(minilm, client2):
    kw = {**SMALL, "rows_per_head": 3, "seed": 7}
    here = sweep.run(source="bert", model=minilm, **kw)
    there = sweep.run(source="bert", client=client2, **kw)
    pd.testing.assert_frame_equal(here, there, check_exact=True)
    # other batching and task split: the same rows are drawn
    other = sweep.run(source="bert", model=minilm, **{**kw, "batch_size": 4, "task_size": 8})
    np.testing.assert_array_equal(other[["text", "layer", "head", "row"]].to_numpy(),
                                  here[["text", "layer", "head", "row"]].to_numpy())
    tok = minilm[1]
    T = [len(tok(t, truncation=True, max_length=40)["input_ids"])
         for t in corpus.texts(5)]
    counts = here[here.eps == 0.1].groupby(["text", "layer", "head"]).size()
    for (i, layer, head), c in counts.items():
        assert c == min(T[i], 3)
        rows = here[(here["text"] == i) & (here["layer"] == layer) & (here["head"] == head)
                    & (here["eps"] == 0.1)]["row"].to_numpy()
        if T[i] > 3:
            want = np.sort(np.random.default_rng([7, i, layer, head]).choice(T[i], 3,
                                                                             replace=False))
            np.testing.assert_array_equal(rows, want)
    seed8 = sweep.run(source="bert", model=minilm, **{**kw, "seed": 8})
    assert not np.array_equal(seed8["row"].to_numpy(), here["row"].to_numpy())


# ----------------------------------------------------------------- failures

def test_worker_killed_mid_task(reference, client2, tmp_path):
    gate = str(tmp_path / "gate")
    key = _sweepstore._GATE_ENV

    def set_gate(value):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

    client2.run(set_gate, f"{gate}:0")
    result = {}

    def drive():
        try:
            result["data"] = sweep.run(source="bert", client=client2, out=tmp_path / "d",
                                       **SMALL)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    t = threading.Thread(target=drive)
    t.start()
    try:
        # wait until both workers hold a computed task at the gate
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            started = [f for f in os.listdir(tmp_path) if f.startswith("gate.started-")]
            if len({f.rsplit("-", 1)[1] for f in started}) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the workers never reached the gate")
        victim = started[0]
        task, pid = (int(v) for v in victim[len("gate.started-"):].split("-"))
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        open(gate, "w").close()
        t.join(180)
        client2.run(set_gate, None)
    assert "error" not in result, result.get("error")
    _, manifest = _check_dataset(tmp_path / "d", reference)
    rec = next(r for r in manifest if r["task"] == task)
    assert rec["pid"] != pid          # the killed worker's task was run by another one


def _cli_env(gate):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    env[_sweepstore._GATE_ENV] = f"{gate}:2"
    env["PYTHONFAULTHANDLER"] = "1"  # a hung run's stacks on SIGABRT
    return env


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_cli_interrupted_then_resumed(sig, reference, tmp_path, capsys):
    out = tmp_path / "res"
    gate = tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, "-m", "topkattn", "sweep", *CLI_SMALL,
                             "--out", str(out)], env=_cli_env(gate), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        manifest = out / "dataset" / "_manifest.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            lines = manifest.read_text().splitlines() if manifest.exists() else []
            if len(lines) == 2 and any(f.startswith("gate.started-2-")
                                       for f in os.listdir(tmp_path)):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the sweep did not stop at the gate: {proc.communicate()}")
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # the interrupted sweep did not exit: its threads' stacks (faulthandler) say where
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=30)
            pytest.fail(f"the sweep did not exit within 60 s of {sig!r}:\n{err[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "--resume continues" in err
        assert "Traceback" not in err
        meta = json.loads((out / "dataset" / "_run.json").read_text())
        assert meta["sessions"][-1]["status"] == "interrupted" and meta["tasks_done"] == 2
    else:
        assert proc.returncode == -signal.SIGKILL
    first = [json.loads(ln) for ln in manifest.read_text().splitlines()]
    assert [r["task"] for r in first] == [0, 1]
    # without --resume the unfinished sweep is kept and the command refuses
    assert cli.main(["sweep", *CLI_SMALL, "--out", str(out)]) == 1
    assert "--resume continues it" in capsys.readouterr().err
    # other settings cannot resume it
    assert cli.main(["sweep", *CLI_SMALL, "--out", str(out), "--resume", "--seed", "1"]) == 1
    assert "other settings (seed differ)" in capsys.readouterr().err
    assert cli.main(["sweep", *CLI_SMALL, "--out", str(out), "--resume"]) == 0
    data, manifest = _check_dataset(out / "dataset", reference)
    # tasks 0 and 1 were not computed again
    assert [r["pid"] for r in manifest[:2]] == [proc.pid, proc.pid]
    assert {r["pid"] for r in manifest[2:]} == {os.getpid()}
    assert len(data.metadata["sessions"]) == 2
    df = pd.read_csv(out / "sweep.csv")
    pd.testing.assert_frame_equal(df, reference, check_exact=False, rtol=1e-12)


def test_resume_and_overwrite_rules(reference, minilm, tmp_path):
    d = tmp_path / "d"
    sweep.run(source="bert", model=minilm, out=d, **SMALL)
    with pytest.raises(FileExistsError, match="already holds a sweep .complete.; pass resume"):
        sweep.run(source="bert", model=minilm, out=d, **SMALL)
    before = (d / "_manifest.jsonl").read_text()
    again = sweep.run(source="bert", model=minilm, out=d, resume=True, **SMALL)
    assert again.complete and (d / "_manifest.jsonl").read_text() == before
    # a record torn by a kill while it was appended: that task runs again, once
    lines = before.splitlines()
    (d / "_manifest.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    again = sweep.run(source="bert", model=minilm, out=d, resume=True, **SMALL)
    _, manifest = _check_dataset(d, reference)
    assert manifest[-1]["task"] == json.loads(lines[-1])["task"]
    with pytest.raises(ValueError, match=r"other settings \(eps, expected_rows differ\)"):
        sweep.run(source="bert", model=minilm, out=d, resume=True, **{**SMALL, "eps": [0.1]})
    with pytest.raises(ValueError, match="texts_sha256"):
        sweep.run(source="bert", model=minilm, out=d, resume=True,
                  **{**SMALL, "texts": ["Another text entirely."] * 5})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        sweep.run(source="bert", model=minilm, out=other, **SMALL)
    assert os.listdir(other) == ["notes.txt"]
    with pytest.raises(ValueError, match="resume applies to a sweep written to a directory"):
        sweep.run(source="bert", model=minilm, resume=True, **SMALL)
    with pytest.raises(ValueError, match="out, resume apply to source='bert' only"):
        sweep.run(source="synthetic", n=[64], out=other, resume=True, progress=False)
    with pytest.raises(FileNotFoundError, match="not a sweep dataset"):
        sweep.open_dataset(other)
    with pytest.raises(TypeError, match="with a client, model must be None or a name"):
        sweep.run(source="bert", model=minilm, client=object(), **SMALL)


def test_missing_extras_are_named(minilm, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"needs pyarrow: pip install 'topkattn\[dist\]'"):
        sweep.run(source="bert", model=minilm, out=tmp_path / "d", **SMALL)
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"needs dask.distributed: pip install 'topkattn\[di"):
        sweep.run(source="bert", client=object(), **SMALL)


def test_cli_without_pyarrow_keeps_rows_in_memory(reference, tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    out = tmp_path / "res"
    assert cli.main(["sweep", *CLI_SMALL[:-2], "--no-plots", "--out", str(out)]) == 0
    stdout, err = capsys.readouterr()
    assert "no Parquet dataset: pyarrow is not installed" in err
    assert sorted(os.listdir(out)) == ["sweep.csv", "sweep.json"]
    assert "rho_median" in stdout
    assert cli.main(["sweep", *CLI_SMALL, "--resume", "--out", str(tmp_path / "r")]) == 1
    assert "needs pyarrow: pip install 'topkattn[dist]'" in capsys.readouterr().err
    monkeypatch.undo()    # pandas reads CSV with pyarrow when it can
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv"), reference,
                                  check_exact=False, rtol=1e-12)


def test_package_imports_without_dask_and_pyarrow():
    code = ("import sys\n"
            "for m in ('dask', 'distributed', 'pyarrow', 'datasets'):\n"
            "    sys.modules[m] = None\n"
            "import topkattn, topkattn.sweep, topkattn.cli, topkattn.corpus\n"
            "df = topkattn.sweep.run('synthetic', n=[64], sigma=[1.0], eps=[0.1], rows=2,\n"
            "                        progress=False)\n"
            "print(len(df))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


# ----------------------------------------------------------------- the command line

def test_cli_one_worker(reference, tmp_path, capsys):
    out = tmp_path / "res"
    assert cli.main(["sweep", *CLI_SMALL, "--workers", "1", "--out", str(out)]) == 0
    data, _ = _check_dataset(out / "dataset", reference)
    assert data.metadata["sessions"][0]["workers"].startswith("1 worker at tcp://")
    assert len(data.metadata["peak_rss_mib_by_worker"]) == 1
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["metadata"]["arguments"]["rows"] == len(reference)
    assert doc["metadata"]["run"]["peak_rss_mib_by_worker"] == \
        data.metadata["peak_rss_mib_by_worker"]
    assert len(doc["records"]) == 2 * 2
    pd.testing.assert_frame_equal(pd.read_csv(out / "sweep.csv"), reference,
                                  check_exact=False, rtol=1e-12)
    # a finished sweep in --out is replaced by the next one; --csv-max-rows 0: no CSV
    assert cli.main(["sweep", *CLI_SMALL, "--out", str(out), "--csv-max-rows", "0",
                     "--rows-per-head", "2"]) == 0
    assert not (out / "sweep.csv").exists()
    assert 0 < sweep.open_dataset(out / "dataset").rows < len(reference)


def test_cli_joins_a_running_cluster(reference, client2, tmp_path, capsys):
    out = tmp_path / "res"
    address = client2.scheduler.address
    assert cli.main(["sweep", *CLI_SMALL, "--scheduler", address, "--out", str(out)]) == 0
    data, _ = _check_dataset(out / "dataset", reference)
    assert data.metadata["sessions"][0]["workers"] == f"2 workers at {address}"
    assert len(client2.scheduler_info()["workers"]) == 2     # the cluster is left running


def test_cli_text_file_formats(minilm, tmp_path):
    texts = ["Return the number of items in a container.",
             "Split the pathname into a pair of head and tail.",
             "Create a new dictionary with keys from an iterable."]
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)))
    out = tmp_path / "res"
    assert cli.main(["sweep", "--text-file", str(src), "--field", "body", "--texts", "2",
                     "--layers", "1", "--eps", "0.1", "--quiet", "--no-plots",
                     "--out", str(out)]) == 0
    want = sweep.run(source="bert", model=minilm, texts=texts[:2], layers=[1], eps=[0.1],
                     progress=False)
    pd.testing.assert_frame_equal(sweep.open_dataset(out / "dataset").to_pandas(), want,
                                  check_exact=True)


@pytest.mark.parametrize("args, message", [
    (["--source", "synthetic", "--workers", "2"], "--workers apply to --source bert only"),
    (["--source", "synthetic", "--resume"], "--resume apply to --source bert only"),
    (["--workers", "2", "--scheduler", "tcp://x:1"], "not allowed with argument"),
    (["--workers", "0"], "argument --workers: must be >= 1"),
    (["--rows-per-head", "0"], "argument --rows-per-head: must be >= 1"),
])
def test_cli_bad_distributed_arguments(args, message, tmp_path, capsys):
    assert cli.main(["sweep", *args, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------- texts from files

TEXTS = ["First text here.", "Second one, a little longer.", "Third."]


def test_load_text_lines_and_jsonl(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("\n".join(TEXTS) + "\n\n  \n")
    assert corpus.load(p) == TEXTS
    assert corpus.load(p, count=2) == TEXTS[:2]
    j = tmp_path / "t.jsonl"
    j.write_text("\n".join(json.dumps({"text": t, "n": 1}) for t in TEXTS) + "\n")
    assert corpus.load(j) == TEXTS
    j2 = tmp_path / "s.ndjson"
    j2.write_text("\n".join(json.dumps(t) for t in TEXTS))
    assert corpus.load(j2) == TEXTS
    with pytest.raises(ValueError, match=r"t.jsonl:1: no field 'body'"):
        corpus.load(j, field="body")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        corpus.load(bad)
    num = tmp_path / "num.jsonl"
    num.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="expected a string, got int"):
        corpus.load(num)
    with pytest.raises(ValueError, match="field applies to JSON Lines files"):
        corpus.load(p, field="text")
    with pytest.raises(ValueError, match="column applies to Parquet files"):
        corpus.load(j, column="text")
    with pytest.raises(FileNotFoundError, match="no such file"):
        corpus.load(tmp_path / "none.txt")
    empty = tmp_path / "e.txt"
    empty.write_text("\n \n")
    with pytest.raises(OSError, match="no non-empty texts"):
        corpus.load(empty)
    with pytest.raises(ValueError, match="count must be an integer >= 1"):
        corpus.load(p, count=0)


def test_load_parquet(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "body": TEXTS}), p)
    assert corpus.load(p, column="body") == TEXTS
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: id, body\)"):
        corpus.load(p)


def test_load_saved_dataset(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": TEXTS, "label": [0, 1, 0]}).save_to_disk(str(d))
    assert corpus.load(d) == TEXTS
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"t": TEXTS}),
                          "test": datasets.Dataset.from_dict({"t": TEXTS[:1]})}
                         ).save_to_disk(str(dd))
    with pytest.raises(ValueError, match="holds the splits train, test"):
        corpus.load(dd, column="t")
    assert corpus.load(dd / "test", column="t") == TEXTS[:1]
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="HuggingFace datasets, which is not installed"):
        corpus.load(d)


def test_corpus_docstring_examples():
    import doctest
    result = doctest.testmod(corpus, verbose=False, report=True)
    assert result.attempted > 0 and result.failed == 0
