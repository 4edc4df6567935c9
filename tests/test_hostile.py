"""Hostile input to the storage, config and data layers (issue 12): passwords with every URL
character, storage files that are not storages, concurrent cache writers, YAML bombs, text that
is not UTF-8, names and values that only look valid. Each test covers a class of input, not one
reproduction; all run in seconds without a study.
"""

from __future__ import annotations

import json
import os
import string
from pathlib import Path
from urllib.parse import quote, unquote

import pytest

from ablate.errors import UserError

# Every character a URL may carry (reserved, unreserved, unsafe, a space, a tab, non-ASCII).
URL_CHARS = sorted(set(string.punctuation) | {" ", "\t", "é", "€"})
LEFT, RIGHT = "s3cr3t", "XyZ9q"  # the two halves of each test password: neither may ever show


def _urls(password: str) -> list[str]:
    return [f"postgresql://bob:{password}@127.0.0.1:1/db", f"postgres://bob:{password}@db.example:5432/x",
            f"postgresql+psycopg2://bob:{password}@h/db?sslmode=require", f"mysql://bob:{password}@h:3306/db",
            f"mysql+pymysql://bob:{password}@h/db", f"sqlite://bob:{password}@/x.db"]


def _leaks(text: str) -> bool:
    return LEFT in text or RIGHT in text


# -- item 5: passwords never leak, whatever they hold -------------------------------------------


@pytest.mark.parametrize("char", URL_CHARS, ids=[f"{ord(c):x}" for c in URL_CHARS])
@pytest.mark.parametrize("encoded", [False, True], ids=["raw", "percent-encoded"])
def test_redact_hides_passwords_with_any_url_character(char, encoded):
    from ablate.storage import _scrub, check_storage_url, redact

    secret = f"{LEFT}{char}{RIGHT}"
    written = quote(secret, safe="") if encoded else secret
    for url in _urls(written):
        shown = redact(url)
        assert not _leaks(shown) and "bob:***@" in shown, (url, shown)
        # a driver's message quoting the password, raw or decoded, or a DSN with password=
        message = f'FATAL: password "{secret}" for "bob" ({written}); dsn password={written} host=h'
        assert not _leaks(_scrub(message, url)), _scrub(message, url)
        try:
            check_storage_url(url)
        except UserError as exc:
            assert not _leaks(str(exc)), str(exc)


@pytest.mark.parametrize("char", [" ", "@", ":", "/", "%", "#", "?", "&", "="])
def test_an_unreachable_server_never_prints_the_password(char, monkeypatch):
    pytest.importorskip("psycopg2")
    from ablate.storage import open_storage

    for secret in (f"{LEFT}{char}{RIGHT}", f"{LEFT}{char}{char}{RIGHT}{char}"):
        with pytest.raises(UserError) as info:
            open_storage(f"postgresql://bob:{secret}@127.0.0.1:1/db")
        assert not _leaks(str(info.value)) and "bob:***@" in str(info.value), str(info.value)


def test_an_unescaped_at_in_the_password_is_refused_with_the_fix():
    from ablate.storage import check_storage_url

    with pytest.raises(UserError, match="unescaped '@'.*percent-encode") as info:
        check_storage_url(f"postgresql://u:{LEFT}@{RIGHT}@127.0.0.1:1/db")
    assert not _leaks(str(info.value))
    check_storage_url(f"postgresql://u:{quote(LEFT + '@' + RIGHT, safe='')}@127.0.0.1:1/db")  # encoded: fine


def test_redaction_keeps_urls_without_a_password():
    from ablate.storage import redact

    for url in ("sqlite:////tmp/a@b/x.db", "sqlite:///rel/x.db", "journal:/tmp/u:p@x.log", "postgresql://bob@h/db",
                "postgresql://h:5432/db", "mysql://bob@h/db?charset=utf8"):
        assert redact(url) == url
    assert redact("postgresql://bob:pw@h/db?sslmode=require") == "postgresql://bob:***@h/db?sslmode=require"
    assert unquote(redact("postgresql://h/db?password=abc&x=1")) == "postgresql://h/db?password=***&x=1"


# -- item 13: storage files that are not storages ------------------------------------------------


def _storage_cases(tmp: Path) -> list[tuple[str, str]]:
    (tmp / "folder").mkdir()
    (tmp / "garbage.log").write_text("garbage\n")
    (tmp / "binary.log").write_bytes(bytes(range(256)) * 4)
    (tmp / "one-line.log").write_text("no newline at all")
    (tmp / "json-not-journal.log").write_text('{"a": 1}\n[1, 2]\n')
    good = json.dumps({"op_code": 0, "worker_id": "w", "study_name": "x", "directions": [1]})
    (tmp / "bad-second-line.log").write_text(good + "\nnot json\n" + good + "\n")
    (tmp / "garbage.db").write_text("garbage\n" * 100)
    (tmp / "binary.db").write_bytes(os.urandom(4096))
    return [
        ("journal:", "names no file"),
        ("journal:   ", "names no file"),
        (f"journal:{tmp / 'folder'}", "is a folder"),
        (f"journal:{tmp / 'folder'}/", "is a folder"),
        (f"{tmp / 'missing' / 'x.log'}", "does not exist"),
        (f"journal:{tmp / 'garbage.log'}", "is not an Optuna journal"),
        (f"journal:{tmp / 'binary.log'}", "is not an Optuna journal"),
        (f"journal:{tmp / 'one-line.log'}", "is not an Optuna journal"),
        (f"journal:{tmp / 'json-not-journal.log'}", "is not an Optuna journal"),
        (f"journal:{tmp / 'bad-second-line.log'}", "line 2 is not a journal record"),
        (f"{tmp / 'garbage.log'}", "is not an Optuna journal"),
        (f"sqlite:///{tmp / 'garbage.db'}", "is not an SQLite database"),
        (f"sqlite:///{tmp / 'binary.db'}", "is not an SQLite database"),
        (f"sqlite:///{tmp / 'folder'}", "is not a file"),
    ]


def test_storage_files_that_are_not_storages_give_one_line(tmp_path):
    from ablate.storage import Worker, open_storage

    for url, expect in _storage_cases(tmp_path):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        for call in (open_storage, lambda u: Worker(u, "x", tmp_path / "study")):
            with pytest.raises(UserError) as info:
                call(url)
            message = str(info.value)
            assert expect in message and "\n" not in message, (url, message)
            assert "PGPASSWORD" not in message and "host" not in message, (url, message)
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, url  # no .workers/, no lock, no journal


def test_a_journal_cut_mid_line_by_a_kill_still_opens(tmp_path):
    from ablate.storage import open_storage

    path = tmp_path / "study.log"
    import optuna

    optuna.create_study(study_name="x", storage=open_storage(f"journal:{path}"))
    with open(path, "ab") as f:
        f.write(b'{"op_code": 1, "worker')  # a writer killed mid-line: Optuna ignores the tail
    open_storage(f"journal:{path}")


def test_a_broken_sqlite_file_is_not_blamed_on_the_network(tmp_path):
    from ablate.storage import open_storage

    path = tmp_path / "study.db"
    path.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84 + b"garbage" * 200)  # right header, bad pages
    with pytest.raises(UserError) as info:
        open_storage(f"sqlite:///{path}")
    assert "PGPASSWORD" not in str(info.value) and "another --storage" in str(info.value)


# -- item 19: concurrent writers of one cache entry; leftovers of killed writers ------------------


def _write_corpus(path: Path, docs: int = 400) -> Path:
    words = "the cat sat on a mat and ran under one big red tree".split()
    path.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(30)) for i in range(docs)))
    return path


def _pack_in_child(corpus, tokenizer, home, barrier, conn):
    import threading

    import ablate.data as data

    real = Path.rename

    def rename(self, target):  # every writer that gets this far renames at the same moment
        if ".partial-" in self.name:
            try:
                barrier.wait(timeout=2)
            except threading.BrokenBarrierError:  # the others never got here (they waited on the lock)
                pass
        return real(self, target)

    Path.rename = rename
    try:
        packed = data.load_packed(str(corpus), tokenizer, seq_len=16, train_tokens=64 * 16, val_tokens=4 * 16,
                                  cache_dir=home, progress=False)
        conn.send(("ok", int(packed.train.sum())))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def test_processes_packing_one_cache_entry_at_once_share_it(tmp_path, tiny_tokenizer):
    import multiprocessing

    corpus = _write_corpus(tmp_path / "corpus.txt")
    ctx = multiprocessing.get_context("fork")
    n = 3
    barrier = ctx.Barrier(n)
    pipes, procs = [], []
    for _ in range(n):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_pack_in_child, args=(corpus, tiny_tokenizer, tmp_path / "cache", barrier, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    results = [p.recv() if p.poll(60) else ("error", "timeout") for p in pipes]
    for proc in procs:
        proc.join(10)
    assert all(r[0] == "ok" for r in results), results
    assert len({r[1] for r in results}) == 1  # the same rows for everyone
    entries = [p.name for p in (tmp_path / "cache").iterdir()]
    assert len(entries) == 1 and not entries[0].startswith("."), entries  # no .partial-* or lock left in it


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("errno_name", ["ENOTEMPTY", "EEXIST"])
def test_atomic_dir_keeps_the_result_of_a_writer_that_renamed_first(tmp_path, monkeypatch, overwrite, errno_name):
    """The race lost between the existence check and the rename: the kernel refuses the rename
    (ENOTEMPTY on Linux, EEXIST elsewhere); the other writer's result stays, ours is removed."""
    import errno

    from ablate import fsutil

    final = tmp_path / "entry"
    if overwrite:
        final.mkdir()
        (final / "stale.txt").write_text("stale")
    real = Path.rename

    def racing_rename(self, target):
        if Path(target) == final and ".partial-" in self.name:  # the other writer won just now
            final.mkdir(exist_ok=True)
            (final / "theirs.txt").write_text("theirs")
            raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", racing_rename)
    with pytest.raises(FileExistsError):
        with fsutil.atomic_dir(final, overwrite=overwrite) as tmp:
            (tmp / "ours.txt").write_text("ours")
    assert (final / "theirs.txt").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # our temporary and the stale copy are gone


def test_a_failed_overwrite_puts_the_previous_folder_back(tmp_path, monkeypatch):
    from ablate import fsutil

    final = tmp_path / "export"
    final.mkdir()
    (final / "previous.txt").write_text("previous")
    real = Path.rename

    def failing(self, target):
        if Path(target) == final and ".partial-" in self.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(PermissionError):
        with fsutil.atomic_dir(final, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (final / "previous.txt").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket
    import subprocess
    import sys

    from ablate import fsutil

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            f".export.partial-{dead_pid}@{host}-abc123": False,  # its writer is gone: removed
            f".3.old-{dead_pid}@{host}-k_9": False,
            f".export.partial-{live.pid}@{host}-abc123": True,  # a live writer: kept
            f".export.partial-{os.getpid()}@{host}-abc123": True,  # ours
            f".export.partial-{dead_pid}@another-machine-abc123": True,  # another host decides
            ".export.partial-xyz123": True,  # an old-style name: no owner known, kept
            "export": True,
        }
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "f").write_text("x")
        with fsutil.atomic_dir(tmp_path / "other") as tmp:
            assert tmp.name.startswith(f".other.partial-{os.getpid()}@{host}-")
        kept = {p.name for p in tmp_path.iterdir()}
        assert kept == {n for n, keep in names.items() if keep} | {"other"}
    finally:
        live.kill()
        live.wait()


# -- config: names, values, YAML (items 11, 15, 16, 17, 18) --------------------------------------


def _default_with(*overrides):
    from ablate.config import load_study_config

    return load_study_config(None, list(overrides))


@pytest.mark.parametrize("tail", ["\n", "\r", "\r\n", "\n\n", "\t", "\x00", "\x0b", "\u2028", " "])
def test_a_study_name_with_a_control_character_is_refused(tail):
    """Item 15: a name that names a folder is checked to its true end (``$`` also matches before a final newline)."""
    from ablate.config import parse_config

    tree = _default_with().model_dump(mode="json")
    for name in (f"evil{tail}", f"{tail}evil", f"ev{tail}il"):
        with pytest.raises(UserError, match="study name"):
            parse_config({**tree, "name": name})
    with pytest.raises(UserError, match="study name"):
        _default_with(f"name={json.dumps('evil' + tail)}")


@pytest.mark.parametrize("name", ["123", "007", "true", "false", "yes", "no", "on", "null", "1e3", "0x1F", "1.5"])
def test_study_names_that_yaml_would_type_are_names(name):
    """Item 18: ``--study 123`` / ``--study true`` (an override of a text field) keep their text."""
    assert _default_with(f"name={name}").name == name


def test_text_fields_written_as_numbers_in_a_file_say_to_quote(tmp_path):
    from ablate.config import load_study_config

    path = tmp_path / "s.yaml"
    path.write_text((Path(__file__).parents[1] / "ablate" / "studies" / "default.yaml").read_text()
                    .replace("name: ", "name: 123 #", 1))
    with pytest.raises(UserError, match='name: Input should be a valid string; .*quote it'):
        load_study_config(path)


@pytest.mark.parametrize("key", ["train.tokens", "train.lr", "train.eval_every", "data.seq_len", "data.val_tokens",
                                 "repeats", "methods.moe.experts", "methods.moe.router_std", "eval.batch_size",
                                 "train.betas.0"])
@pytest.mark.parametrize("value", ["true", "false"])
def test_true_and_false_are_not_numbers(key, value):
    """Item 18: pydantic reads ``tokens: true`` as 1; every numeric field refuses booleans."""
    with pytest.raises(UserError, match=rf"{key}: expected a number, got {value}"):
        _default_with(f"{key}={value}")


def _float_fields(model, prefix=""):
    from pydantic import BaseModel

    from ablate.config import _leaves

    for name, field in model.model_fields.items():
        leaves = _leaves(field.annotation)
        for leaf in leaves:
            if isinstance(leaf, type) and issubclass(leaf, BaseModel):
                yield from _float_fields(leaf, f"{prefix}{name}.")
        if float in leaves:
            yield f"{prefix}{name}"


def test_every_float_of_the_schema_refuses_inf_and_nan():
    """Item 16: a non-finite float fails its trial on NaN and uses up the configuration."""
    from ablate.config import StudyConfig

    keys = list(_float_fields(StudyConfig))
    assert {"methods.moe.router_std", "methods.moe.expert_noise", "train.lr"} <= set(keys)
    for key in keys:
        for value in (".inf", "-.inf", ".nan"):
            with pytest.raises(UserError, match=rf"{key}: "):
                _default_with(f"{key}={value}")


@pytest.mark.parametrize("override, bound", [
    ("repeats=100000000", "less than or equal to 1000"),
    ("methods.moe.experts=1000000", "less than or equal to 1024"),
    ("bases=" + json.dumps([{"model": "llama-4l", "label": f"b{i}"} for i in range(101)]), "at most 100 items"),
    ("bases.0.m=" + json.dumps(list(range(2000))), "at most 1024 items"),
])
def test_what_a_config_may_ask_for_is_bounded_with_the_bound_in_the_error(override, bound):
    """Item 11: the search space is enumerated, so its size is bounded before anything runs."""
    with pytest.raises(UserError, match=bound):
        _default_with(override)


@pytest.mark.parametrize("document, expect", [
    ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdefghi", "bcdefghij", strict=True)),
     "YAML bomb"),
    ("name: &a [*a]\n", "refers to its own anchor"),
    ("name: &a {k: *a}\n", "refers to its own anchor"),
    ("x: &x 1\nl: [" + ", ".join(["*x"] * 1001) + "]\n", "more than 1000 aliases"),
    ("name: " + "[" * 20000, "not valid YAML"),
])
def test_yaml_bombs_and_recursive_anchors_are_refused(tmp_path, document, expect):
    """Item 11: PyYAML has no alias limit; the loader bounds aliases, expansion and recursion."""
    from ablate.config import load_study_config

    path = tmp_path / "bomb.yaml"
    path.write_text(document)
    with pytest.raises(UserError, match=expect) as info:
        load_study_config(path)
    assert "\n" not in str(info.value)


def test_a_yaml_bomb_in_an_override_is_refused_by_the_same_loader():
    import yaml

    from ablate.config import load_yaml

    flow = "[&a [1, 1, 1, 1, 1, 1, 1, 1], " + ", ".join(
        f"&{c} [{', '.join(['*' + p] * 8)}]" for p, c in zip("abcdefg", "bcdefgh", strict=False)) + "]"
    with pytest.raises(yaml.YAMLError, match="YAML bomb"):
        load_yaml(flow)


def test_anchors_and_merge_keys_of_an_ordinary_config_still_load(tmp_path):
    import yaml

    from ablate.config import load_study_config

    tree = _default_with().model_dump(mode="json")
    del tree["bases"]
    text = yaml.safe_dump(tree) + ("bases:\n  - &b {model: llama-4l, label: a, moe: false}\n"
                                   "  - {<<: *b, label: b}\n")
    path = tmp_path / "anchors.yaml"
    path.write_text(text)
    config = load_study_config(path)
    assert [(b.label, b.moe) for b in config.bases] == [("a", False), ("b", False)]


@pytest.mark.parametrize("content", [bytes(range(256)), "name: x\n".encode("utf-16"), b"\x00\x01\x02ELF",
                                     b"name: caf\xe9\n"])
def test_a_config_that_is_not_utf8_text_is_one_line(tmp_path, content):
    """Item 17: a binary or non-UTF-8 --config."""
    from ablate.config import load_study_config

    path = tmp_path / "binary.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match="binary.yaml") as info:
        load_study_config(path)
    assert "\n" not in str(info.value)


def test_a_config_path_that_is_a_folder_says_so(tmp_path):
    from ablate.config import load_study_config

    with pytest.raises(UserError, match="is a folder"):
        load_study_config(tmp_path)


@pytest.mark.parametrize("source", ["hf:", "hf: ", "hf:  "])
def test_an_empty_hub_source_names_the_problem(source):
    """Item 18: YAML reads ``hf:`` as a mapping; it is the hub source with no dataset named."""
    with pytest.raises(UserError, match="names no dataset"):
        _default_with(f"data.source={source}")
    assert _default_with("data.source=hf: org/name").data.source.name == "org/name"


# -- item 12: text that is not UTF-8, malformed records -------------------------------------------

_TEXT = "".join(f"document {i}: " + "the cat sat on the mat and ran under one big red tree " * 8 + "\n\n"
                for i in range(120))


def _pack(source, tokenizer, tmp_path):
    from ablate.data import load_packed

    return load_packed(source, tokenizer, seq_len=16, train_tokens=16 * 40, val_tokens=16 * 2,
                       cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize("name, content, offset", [
    ("stray-cp1252.txt", _TEXT.encode()[:5000] + b"caf\xe9 " + _TEXT.encode()[5000:], 5003),  # GCIDE's case
    ("utf16.txt", _TEXT.encode("utf-16"), 0),
    ("truncated.txt", _TEXT.encode() + "é".encode()[:1], len(_TEXT.encode())),
    ("bad.jsonl", b'{"text": "caf\xe9 au lait"}\n' * 3, 13),
], ids=["stray-cp1252", "utf-16", "truncated", "jsonl"])
def test_text_that_is_not_utf8_names_the_file_and_byte(tmp_path, tiny_tokenizer, name, content, offset):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        _pack(str(path), tiny_tokenizer, tmp_path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "encoding" in message, message
    if "ends inside" not in message:
        assert f"byte {offset:,}" in message, message
    assert not (tmp_path / "cache").exists() or not any(p for p in (tmp_path / "cache").iterdir())


@pytest.mark.parametrize("encoding, errors, content", [
    ("cp1252", "strict", _TEXT.replace("cat", "café").encode("cp1252")),
    ("utf-16", "strict", _TEXT.encode("utf-16")),
    ("utf-8", "replace", _TEXT.encode()[:5000] + b"\xe9\xff" + _TEXT.encode()[5000:]),
    ("utf-8", "ignore", _TEXT.encode()[:5000] + b"\xe9\xff" + _TEXT.encode()[5000:]),
], ids=["cp1252", "utf-16", "replace", "ignore"])
def test_the_data_source_names_its_encoding_or_how_to_treat_bad_bytes(tmp_path, tiny_tokenizer, encoding, errors,
                                                                       content):
    from ablate.data import DataSource

    path = tmp_path / "corpus.txt"
    path.write_bytes(content)
    src = DataSource(kind="files", path=str(path), encoding=encoding, encoding_errors=errors)
    assert _pack(src, tiny_tokenizer, tmp_path).train.shape == (40, 16)


def test_an_unknown_encoding_is_a_config_error():
    from pydantic import ValidationError

    from ablate.data import DataSource

    with pytest.raises(ValidationError, match="not a known text encoding"):
        DataSource(kind="files", path="x.txt", encoding="klingon-8")


def test_a_malformed_jsonl_line_is_named(tmp_path, tiny_tokenizer):
    path = tmp_path / "corpus.jsonl"
    good = json.dumps({"text": _TEXT[:400]}) + "\n"
    path.write_text(good * 60 + '{"text": broken\n' + good * 60)
    with pytest.raises(UserError, match=r"corpus.jsonl: line 61 is not valid JSON") as info:
        _pack(str(path), tiny_tokenizer, tmp_path)
    assert "\n" not in str(info.value)


def test_a_study_with_too_many_configurations_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    """Issue 12 item 11: the search space is enumerated, so its size is bounded in the preflight."""
    from _studykit import make_kit

    from ablate import preflight
    from ablate.config import parse_config
    from ablate.study import run_study

    kit = make_kit(tmp_path / "kit")
    monkeypatch.setenv("ABLATE_HOME", str(kit.home))
    monkeypatch.setattr(preflight, "MAX_CONFIGURATIONS", 7)  # 4 per repeat, 2 repeats, and the no-CPT reference
    with pytest.raises(UserError, match="has 9 configurations, over 7"):
        run_study(parse_config(kit.tree(repeats=2)), trials=1, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_pieces_of_a_long_document_join_to_it_and_cut_before_whitespace():
    from ablate.data import pieces

    text = "one two three " * 100 + "x" * 300 + " end"
    parts = list(pieces(text, 100))
    assert "".join(parts) == text and len(parts) > 10
    assert all(len(p) <= 100 for p in parts)
    assert all(p[0] == " " for p in parts[1:4])  # cut just before a space, so no word is split
    assert list(pieces("short", 100)) == ["short"]


def test_a_one_line_corpus_is_tokenized_in_pieces_with_the_same_rows(tmp_path, tiny_tokenizer, monkeypatch):
    """Issue 12 item 11: a single huge line no longer goes to the tokenizer in one call (an 18 MB one
    took 4.4 GB); cut before spaces, the pieces give the rows the whole line gives."""
    import numpy as np

    from ablate import data

    words = "the cat sat on a big red mat and the dog ran under one small blue tree".split()
    rng = np.random.default_rng(0)
    corpus, held_out = tmp_path / "one-line.txt", tmp_path / "held-out.txt"
    corpus.write_text(" ".join(rng.choice(words, 6000)) + "\n")
    held_out.write_text(" ".join(rng.choice(words, 2000)) + "\n")
    seen: list[int] = []
    real = data._encode

    def spy(tokenizer, texts, eos, ends=None):
        seen.append(max(map(len, texts)))
        return real(tokenizer, texts, eos, ends)

    monkeypatch.setattr(data, "_encode", spy)
    args = dict(seq_len=32, train_tokens=2048, val_tokens=256, seed=0, progress=False)
    src = data.DataSource(kind="files", path=str(corpus), val_path=str(held_out))
    whole = data.load_packed(src, tiny_tokenizer, cache_dir=tmp_path / "a", **args)
    longest_whole = max(seen)
    seen.clear()
    monkeypatch.setattr(data, "PIECE_CHARS", 500)
    cut = data.load_packed(src, tiny_tokenizer, cache_dir=tmp_path / "b", **args)
    assert max(seen) <= 500 < longest_whole
    np.testing.assert_array_equal(np.asarray(whole.train), np.asarray(cut.train))
    np.testing.assert_array_equal(np.asarray(whole.val), np.asarray(cut.val))


def test_too_little_text_for_one_row_says_what_helps(tmp_path, tiny_tokenizer):
    """Issue 12 item 18: 'lower val_tokens to at most 0' is no fix; with less than one row, say so."""
    from ablate import data

    (tmp_path / "train.txt").write_text("the cat sat on the mat. " * 200)
    (tmp_path / "val.txt").write_text("the dog ran.\n")
    src = data.DataSource(kind="files", path=str(tmp_path / "train.txt"), val_path=str(tmp_path / "val.txt"))
    with pytest.raises(UserError) as info:
        data.load_packed(src, tiny_tokenizer, seq_len=64, train_tokens=256, val_tokens=128, seed=0,
                         cache_dir=tmp_path / "cache", progress=False)
    message = str(info.value)
    assert "at most 0" not in message and "less than one row of seq_len=64" in message


def test_a_data_folder_with_a_symlink_loop_still_packs(tmp_path, tiny_tokenizer):
    """Issue 12 item 12's symlink loop: a folder linking to itself is read once, without a traceback.
    (Not reproduced as a crash on Python 3.11; kept so a change of pathlib's walk cannot bring it.)"""
    from ablate import data

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("the cat sat on the mat.\n\n" * 400)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (tmp_path / "val.txt").write_text("the dog ran under the tree.\n\n" * 100)
    src = data.DataSource(kind="files", path=str(folder), val_path=str(tmp_path / "val.txt"))
    packed = data.load_packed(src, tiny_tokenizer, seq_len=16, train_tokens=512, val_tokens=64, seed=0,
                              cache_dir=tmp_path / "cache", progress=False)
    assert packed.train.shape == (32, 16)
