"""The data pipeline: packed rows from txt/JSONL/Parquet files, the synthetic corpus and the hub.

Checks rows against a plain-Python packing reference, exact budgets, determinism by seed, that
no validation document or row reaches training, cache reuse without tokenizing, that a crash
mid-write leaves no cache that looks complete, and the one-line errors for bad sources
(missing/empty files, missing text field, unsupported format, unreachable hub).
"""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from ablate import data
from ablate.data import DataSource, PackedData, load_packed, parse_source
from ablate.errors import UserError

SEQ = 16


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """Caches go to tmp_path: ours, and the lock files that datasets writes even when streaming."""
    import datasets

    monkeypatch.setenv("ABLATE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


def corpus(n: int = 120, start: int = 0) -> list[str]:
    """Documents of varied length, each tagged with a unique id ``doc NNNN ;``."""
    words = ["the cat sat on the mat .", "a = 7 . b = a . b ?", "dogs run and cats sleep ."]
    return [f"doc {i:04d} ; " + " ".join(words[j % 3] for j in range(1 + i % 5))
            for i in range(start, start + n)]


def write(path, docs: list[str], field: str = "text"):
    """Write ``docs`` in the format named by ``path``'s extension; returns the path."""
    if path.suffix == ".txt":
        path.write_text("\n\n".join(docs) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    elif path.suffix == ".json":  # one JSON array of records
        path.write_text(json.dumps([{field: d} for d in docs]))
    elif path.suffix == ".parquet":
        pd.DataFrame({field: docs}).to_parquet(path)
    return path


class Counting:
    """A tokenizer proxy that counts (and optionally fails) batch-encoding calls."""

    def __init__(self, tok, fail_at: int | None = None):
        self.tok, self.fail_at, self.calls = tok, fail_at, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash while tokenizing")
        return self.tok(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def reference_rows(tok, docs: list[str], rows: int | None = None) -> np.ndarray:
    """Plain packing: each document's ids then EOS, concatenated, cut into rows (stream order);
    ``rows=None``: every whole row."""
    ids = [t for d in docs for t in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]
    rows = len(ids) // SEQ if rows is None else rows
    return np.asarray(ids[: rows * SEQ], dtype=np.int32).reshape(rows, SEQ)


def sorted_rows(a: np.ndarray) -> np.ndarray:
    return a[np.lexsort(a.T[::-1])]


def decoded_ids(tok, rows: np.ndarray) -> set[int]:
    """The document ids whose tag ``doc NNNN ;`` appears whole in any row."""
    return {int(m) for row in rows for m in re.findall(r"doc (\d{4}) ;", tok.decode(row))}


@pytest.mark.parametrize("ext", [".txt", ".jsonl", ".json", ".parquet"])
def test_formats_pack_like_the_reference(tmp_path, tiny_tokenizer, ext):
    train_docs, val_docs = corpus(80), corpus(30, start=500)
    src = DataSource(kind="files", path=str(write(tmp_path / f"train{ext}", train_docs)),
                     val_path=str(write(tmp_path / f"val{ext}", val_docs)))
    packed = load_packed(src, tiny_tokenizer, seq_len=SEQ, train_tokens=20 * SEQ + 5,
                         val_tokens=6 * SEQ, progress=False)
    assert isinstance(packed, PackedData)
    assert packed.train.shape == (20, SEQ) and packed.val.shape == (6, SEQ)
    assert packed.train.dtype == np.int32 and packed.val.dtype == np.int32
    assert packed.train_tokens == 20 * SEQ and packed.val_tokens == 6 * SEQ
    # rows of the stream, shuffled within a window: a window of SHUFFLE_WINDOW rows is read when the
    # text allows, and the 20 rows are the ones with the lowest shuffled places in it
    for got, docs in ((packed.train, train_docs), (packed.val, val_docs)):
        stream = Counter(r.tobytes() for r in reference_rows(tiny_tokenizer, docs))
        assert not Counter(r.tobytes() for r in np.asarray(got)) - stream  # a sub-multiset
    # shuffled: the stream order is not the stored order
    assert not np.array_equal(packed.train, reference_rows(tiny_tokenizer, train_docs, 20))


def test_held_out_documents_never_reach_training(tmp_path, tiny_tokenizer):
    docs = corpus(400)
    path = write(tmp_path / "c.jsonl", docs)
    src = DataSource(kind="files", path=str(path), val_fraction=0.2)
    packed = load_packed(src, tiny_tokenizer, seq_len=128, train_tokens=32 * 128,
                         val_tokens=8 * 128, progress=False)  # ~33 tokens a document
    train_ids, val_ids = decoded_ids(tiny_tokenizer, packed.train), decoded_ids(tiny_tokenizer, packed.val)
    assert len(train_ids) > 80 and len(val_ids) > 20
    assert not train_ids & val_ids
    train_rows = {r.tobytes() for r in np.asarray(packed.train)}
    assert not any(r.tobytes() in train_rows for r in np.asarray(packed.val))
    # the held-out choice is a seed-keyed hash of each document: about val_fraction of them
    chosen = [d for d in docs if data._is_val(d, 0, 0.2)]
    assert 0.12 < len(chosen) / len(docs) < 0.28
    assert val_ids <= {int(d[4:8]) for d in chosen}
    # the held-out rows do not depend on the training budget
    smaller = load_packed(src, tiny_tokenizer, seq_len=128, train_tokens=20 * 128,
                          val_tokens=8 * 128, progress=False)
    np.testing.assert_array_equal(smaller.val, packed.val)


def test_same_seed_same_rows_other_seed_other_order(tmp_path, tiny_tokenizer):
    src = DataSource(kind="files", path=str(write(tmp_path / "t.txt", corpus(100))),
                     val_path=str(write(tmp_path / "v.txt", corpus(20, start=900))))
    kw = dict(seq_len=SEQ, train_tokens=40 * SEQ, val_tokens=4 * SEQ, progress=False)
    a = load_packed(src, tiny_tokenizer, seed=1, cache_dir=tmp_path / "c1", **kw)
    b = load_packed(src, tiny_tokenizer, seed=1, cache_dir=tmp_path / "c2", **kw)
    c = load_packed(src, tiny_tokenizer, seed=2, cache_dir=tmp_path / "c3", **kw)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)
    assert not np.array_equal(a.train, c.train)
    # the text ends inside the first shuffle window, so each seed keeps its own 40 of the window's rows
    stream = Counter(r.tobytes() for r in reference_rows(tiny_tokenizer, corpus(100)))
    for packed in (a, c):
        assert not Counter(r.tobytes() for r in np.asarray(packed.train)) - stream


def test_exact_budgets_and_budget_errors(tmp_path, tiny_tokenizer):
    path = str(write(tmp_path / "c.txt", corpus(200)))
    packed = load_packed(path, tiny_tokenizer, seq_len=SEQ, train_tokens=7 * SEQ + SEQ - 1,
                         val_tokens=0, progress=False)
    assert packed.train.shape == (7, SEQ) and packed.val.shape == (0, SEQ)
    with pytest.raises(UserError, match="train_tokens"):
        load_packed(path, tiny_tokenizer, seq_len=SEQ, train_tokens=SEQ - 1, val_tokens=0)
    with pytest.raises(UserError, match="val_tokens"):
        load_packed(path, tiny_tokenizer, seq_len=SEQ, train_tokens=SEQ, val_tokens=3)


def test_running_out_of_text_says_how_much_there_is(tmp_path, tiny_tokenizer):
    path = str(write(tmp_path / "c.parquet", corpus(20)))
    with pytest.raises(UserError, match=r"ran out of text.*train tokens.*at most") as err:
        load_packed(path, tiny_tokenizer, seq_len=SEQ, train_tokens=10_000 * SEQ,
                    val_tokens=SEQ, progress=False)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "home" / "data").iterdir())  # nothing half-written kept


def test_second_call_reads_the_cache_without_tokenizing(tmp_path, tiny_tokenizer):
    path = write(tmp_path / "c.jsonl", corpus(200))
    kw = dict(seq_len=SEQ, train_tokens=50 * SEQ, val_tokens=5 * SEQ, progress=False)
    first_tok, second_tok = Counting(tiny_tokenizer), Counting(tiny_tokenizer)
    first = load_packed(str(path), first_tok, **kw)
    second = load_packed(str(path), second_tok, **kw)
    assert first_tok.calls > 0 and second_tok.calls == 0
    assert isinstance(second.train, np.memmap) and not second.train.flags.writeable
    np.testing.assert_array_equal(first.train, second.train)
    (folder,) = (tmp_path / "home" / "data").iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "train.npy", "val.npy"]
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["train_rows"] == 50 and meta["seq_len"] == SEQ and meta["train_documents_read"] > 0
    # editing the corpus changes the key: the next call tokenizes again
    write(path, corpus(210))
    third_tok = Counting(tiny_tokenizer)
    load_packed(str(path), third_tok, **kw)
    assert third_tok.calls > 0


def test_crash_mid_write_leaves_no_complete_looking_cache(tmp_path, tiny_tokenizer, monkeypatch):
    path = str(write(tmp_path / "c.txt", corpus(300)))
    kw = dict(seq_len=SEQ, train_tokens=100 * SEQ, val_tokens=10 * SEQ, progress=False)
    monkeypatch.setattr(data, "BATCH_DOCS", 8)  # many tokenizer calls, so the crash is mid-way
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_packed(path, Counting(tiny_tokenizer, fail_at=3), **kw)
    cache = tmp_path / "home" / "data"
    assert not cache.exists() or not any(cache.iterdir())  # no final folder, no partial one
    retry = load_packed(path, tiny_tokenizer, **kw)
    fresh = load_packed(path, tiny_tokenizer, cache_dir=tmp_path / "fresh", **kw)
    np.testing.assert_array_equal(retry.train, fresh.train)
    np.testing.assert_array_equal(retry.val, fresh.val)


def test_folder_of_files_and_txt_units(tmp_path, tiny_tokenizer):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    docs = corpus(60)
    for i in range(3):  # one document per file with txt_unit=document
        (folder / "sub" / f"{i}.txt").write_text("\n\n".join(docs[i * 20:(i + 1) * 20]))
    per_paragraph = DataSource(kind="files", path=str(folder), val_fraction=0.3)
    per_file = DataSource(kind="files", path=str(folder), txt_unit="document", val_fraction=0.3)
    a = load_packed(per_paragraph, tiny_tokenizer, seq_len=SEQ, train_tokens=30 * SEQ,
                    val_tokens=SEQ, progress=False)
    assert a.train.shape == (30, SEQ)
    b = load_packed(per_file, tiny_tokenizer, seq_len=SEQ, train_tokens=10 * SEQ, val_tokens=0,
                    progress=False)
    assert b.train.shape == (10, SEQ) and "files:" in b.source


def test_text_field_is_configurable(tmp_path, tiny_tokenizer):
    path = str(write(tmp_path / "c.jsonl", corpus(100), field="body"))
    with pytest.raises(UserError, match=r"no field 'text' \(fields: body, id\).*text_field") as err:
        load_packed(path, tiny_tokenizer, seq_len=SEQ, train_tokens=4 * SEQ, val_tokens=0,
                    progress=False)
    assert "\n" not in str(err.value)
    src = DataSource(kind="files", path=path, text_field="body")
    packed = load_packed(src, tiny_tokenizer, seq_len=SEQ, train_tokens=4 * SEQ, val_tokens=0,
                         progress=False)
    assert packed.train.shape == (4, SEQ)


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"does not exist.*fix the path"),
    ("empty", r"is empty.*remove it"),
    ("csv", r"unsupported corpus file 'c\.csv'.*\.txt"),
    ("no_corpus_files", r"holds no .* files"),
    ("mixed", r"mixes formats"),
])
def test_bad_paths_are_one_line_user_errors(tmp_path, tiny_tokenizer, case, pattern):
    target = tmp_path / case
    if case == "empty":
        target = tmp_path / "empty.txt"
        target.write_text("")
    elif case == "csv":
        target = tmp_path / "c.csv"
        target.write_text("text\nhello\n")
    elif case in ("no_corpus_files", "mixed"):
        target.mkdir()
        (target / "notes.md").write_text("not a corpus")
        if case == "mixed":
            write(target / "a.txt", corpus(3))
            write(target / "b.jsonl", corpus(3))
    with pytest.raises(UserError, match=pattern) as err:
        load_packed(str(target), tiny_tokenizer, seq_len=SEQ, train_tokens=SEQ, val_tokens=0)
    assert "\n" not in str(err.value)


def test_hub_offline_is_a_one_line_user_error(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"cannot reach the Hugging Face Hub.*offline.*local path") as err:
        load_packed("hf:ablate-test/no-such-dataset:cfg", tiny_tokenizer, seq_len=SEQ,
                    train_tokens=SEQ, val_tokens=0, progress=False)
    assert "\n" not in str(err.value)


def test_hub_connection_errors_from_datasets_become_user_errors(tiny_tokenizer, monkeypatch):
    """Without our offline pre-check, the error datasets raises is still translated."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(data, "_hub_offline", lambda: False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"cannot reach the Hugging Face Hub") as err:
        load_packed("hf:ablate-test/no-such-dataset", tiny_tokenizer, seq_len=SEQ,
                    train_tokens=SEQ, val_tokens=0, progress=False)
    assert "\n" not in str(err.value)


def test_parse_source_and_schema():
    assert parse_source("synthetic") == DataSource(kind="synthetic")
    assert parse_source("hf:org/name") == DataSource(kind="hub", name="org/name")
    hub = parse_source("hf:org/name:sample-10BT")
    assert (hub.name, hub.config, hub.describe()) == ("org/name", "sample-10BT", "hf:org/name:sample-10BT[train]")
    assert parse_source("./data/x.jsonl") == DataSource(kind="files", path="./data/x.jsonl")
    with pytest.raises(UserError, match="names no dataset"):
        parse_source("hf:")
    assert all(f.description for f in DataSource.model_fields.values())
    with pytest.raises(ValidationError, match="Extra inputs"):
        DataSource(kind="synthetic", colour="red")
    with pytest.raises(ValidationError, match="config: not used by kind=files"):
        DataSource(kind="files", path="x.txt", config="en")
    with pytest.raises(ValidationError, match="needs name"):
        DataSource(kind="hub")
    with pytest.raises(ValidationError, match="val_fraction is unused"):
        DataSource(kind="hub", name="a/b", val_split="validation", val_fraction=0.1)
    full = DataSource(kind="hub", name="a/b", val_split="validation")
    assert DataSource.model_validate(full.model_dump()) == full  # a dumped config reloads


def test_tokenizer_fingerprint_tracks_the_vocabulary(tiny_tokenizer):
    from tokenizers import Tokenizer

    fp = data.tokenizer_fingerprint(tiny_tokenizer)
    tiny_tokenizer(["x" * 5000], truncation=True, max_length=8)  # call-time settings do not count
    assert data.tokenizer_fingerprint(tiny_tokenizer) == fp
    copy = Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())  # leave the fixture as is
    other = type(tiny_tokenizer)(tokenizer_object=copy, eos_token="<|endoftext|>")
    assert data.tokenizer_fingerprint(other) == fp
    other.add_tokens(["zebra"])
    assert data.tokenizer_fingerprint(other) != fp


def test_synthetic_corpus_packs_its_train_and_val_splits(tiny_tokenizer):
    synthetic = pytest.importorskip("ablate.synthetic")  # written alongside this module
    packed = load_packed("synthetic", tiny_tokenizer, seq_len=SEQ, train_tokens=40 * SEQ,
                         val_tokens=8 * SEQ, seed=3, progress=False)
    assert packed.source == "synthetic"
    for split, rows, got in (("train", 40, packed.train), ("val", 8, packed.val)):
        docs = list(itertools.islice(synthetic.iter_documents(split, seed=3), 40 * SEQ))
        # the first shuffle window is read whole; the rows kept are some of its rows
        window = Counter(r.tobytes() for r in reference_rows(tiny_tokenizer, docs, data.SHUFFLE_WINDOW))
        assert got.shape[0] == rows and not Counter(r.tobytes() for r in np.asarray(got)) - window
    train_rows = {r.tobytes() for r in np.asarray(packed.train)}
    assert not any(r.tobytes() in train_rows for r in np.asarray(packed.val))


def test_hub_loading_code_on_a_local_dataset_repo(tmp_path, tiny_tokenizer, monkeypatch):
    """The hub path (``load_dataset(name, config, split=..., streaming=True)``) on a local folder
    laid out like a hub dataset repo, with its own validation split."""
    repo = tmp_path / "repo"
    repo.mkdir()
    train_docs, val_docs = corpus(80), corpus(30, start=500)
    write(repo / "train.jsonl", train_docs)
    write(repo / "validation.jsonl", val_docs)
    monkeypatch.setattr(data, "_hub_offline", lambda: False)  # a local repo needs no network
    src = DataSource(kind="hub", name=str(repo), val_split="validation")
    packed = load_packed(src, tiny_tokenizer, seq_len=SEQ, train_tokens=20 * SEQ,
                         val_tokens=6 * SEQ, progress=False)
    # rows of the stream, shuffled within a window: a window of SHUFFLE_WINDOW rows is read when the
    # text allows, and the 20 rows are the ones with the lowest shuffled places in it
    for got, docs in ((packed.train, train_docs), (packed.val, val_docs)):
        stream = Counter(r.tobytes() for r in reference_rows(tiny_tokenizer, docs))
        assert not Counter(r.tobytes() for r in np.asarray(got)) - stream  # a sub-multiset
    bad = DataSource(kind="hub", name=str(repo), split="nope")
    with pytest.raises(UserError, match=r"cannot open hub dataset.*check the name, config, split") as err:
        load_packed(bad, tiny_tokenizer, seq_len=SEQ, train_tokens=SEQ, val_tokens=0, progress=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("source", ["synthetic", "files"])
def test_rows_are_prefix_stable_whatever_the_budget(tmp_path, tiny_tokenizer, source):
    """The first r rows of a larger budget are the rows of a budget of r rows (the budget axis
    compares a branch at b tokens with a run of b tokens), across shuffle windows."""
    window = data.SHUFFLE_WINDOW
    src = "synthetic" if source == "synthetic" else str(write(tmp_path / "c.jsonl", corpus(4000)))
    kw = dict(seq_len=16, val_tokens=4 * 16, progress=False)
    rows = [window // 2, window, window + 3, 3 * window - 1]
    packs = [load_packed(src, tiny_tokenizer, train_tokens=r * 16, cache_dir=tmp_path / f"c{r}", **kw)
             for r in rows]
    biggest = np.asarray(packs[-1].train)
    assert biggest.shape[0] == rows[-1]
    for r, packed in zip(rows, packs, strict=True):
        np.testing.assert_array_equal(packed.train, biggest[:r])
        np.testing.assert_array_equal(packed.val, packs[0].val)
    # still a shuffle: inside a window the stored order is not the stream order
    other = load_packed(src, tiny_tokenizer, train_tokens=rows[-1] * 16, seed=1, cache_dir=tmp_path / "s1", **kw)
    assert not np.array_equal(other.train[:window], biggest[:window])
