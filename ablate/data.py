"""Packed, cached token batches for CPT and held-out evaluation.

One entry point, :func:`load_packed`, turns a text source into :class:`PackedData`: train and
validation rows of exactly ``seq_len`` int32 tokens. Sources (:class:`DataSource`, or a string
read by :func:`parse_source`):

- ``"synthetic"``: :func:`ablate.synthetic.iter_documents`; validation reads its ``"val"`` split,
  which is disjoint from ``"train"`` by construction.
- a local file or folder (``"corpus/"``, ``"data.jsonl"``): ``.txt`` (one document per paragraph,
  i.e. documents separated by a blank line; ``txt_unit`` changes that), ``.json``/``.jsonl``
  (one document per record, text in ``text_field``) or ``.parquet`` (one per row), read by the
  ``datasets`` library in streaming mode, so nothing is copied to its cache.
- ``"hf:org/name"`` or ``"hf:org/name:config"``: a Hugging Face Hub dataset, streamed, so a
  10B-token corpus never has to fit on disk.

Validation never shares a document with training. Files and hub datasets hold out a
deterministic, seed-keyed ``val_fraction`` of their documents (chosen by a hash of each
document's text, so even exact duplicates land on one side), unless the source names its own
held-out data (``val_split`` for the hub, ``val_path`` for files).

Packing: documents are batch-tokenized (no special tokens), each followed by EOS, concatenated
and cut into rows; a tail short of a row is dropped. Each row goes straight to its shuffled place
within its window of SHUFFLE_WINDOW rows (so the first r rows are the same whatever the budget) in a
memory-mapped ``.npy``, so memory stays flat at any budget.
The cache, ``ablate_home()/data/<key>/{train.npy,val.npy,meta.json}``, is written with
:func:`~ablate.fsutil.atomic_dir` and reloaded memory-mapped.
"""

from __future__ import annotations

import codecs
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ablate import synthetic
from ablate.errors import UserError, first_line, one_line
from ablate.fsutil import ablate_home, atomic_dir, atomic_write_json, waiting_lock
from ablate.synthetic import iter_documents

__all__ = ["PackedData", "DataSource", "parse_source", "load_packed", "tokenizer_fingerprint"]

CACHE_VERSION = 3  # bump when the packing or the cache layout changes: old caches then miss
# (2: documents longer than PIECE_CHARS are tokenized in pieces; 3: rows shuffled within windows)
SHUFFLE_WINDOW = 256  # rows shuffled together: 32k tokens at seq_len 128, 512k at 2048 (see _Rows)
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
BATCH_DOCS = 1024  # documents per tokenizer call: large enough for the Rust batch encoder
BATCH_CHARS = 4 << 20  # ...but at most ~4 MB of text per call, so long documents stay bounded
# A longer document is tokenized in pieces of about this many characters, cut before a whitespace
# character: the tokenizer's memory grows with the text of one call (an 18 MB one-line corpus took
# 4.4 GB whole), and pieces past a full budget are never tokenized at all.
PIECE_CHARS = 1 << 20


@dataclass(frozen=True)
class PackedData:
    """Token rows of exactly ``seq_len`` tokens, ready for causal-LM training.

    ``train`` is read in row order: row ``i`` is the ``i``-th sequence the trainer sees
    (the order is already shuffled deterministically by the seed it was built with).
    ``val`` rows never share a source document with ``train`` rows.
    """

    train: np.ndarray  # int32 [num_train_rows, seq_len] (may be a read-only np.memmap)
    val: np.ndarray  # int32 [num_val_rows, seq_len]
    seq_len: int
    source: str  # a human-readable description of where the tokens came from
    # ``train`` and the rest of its last shuffle window (see _Rows): a data order that shuffles rows
    # within whole windows reads from here. None: ``train`` itself.
    pool: np.ndarray | None = None

    @property
    def train_pool(self) -> np.ndarray:
        return self.train if self.pool is None else self.pool

    @property
    def train_tokens(self) -> int:
        return int(self.train.shape[0]) * self.seq_len

    @property
    def val_tokens(self) -> int:
        return int(self.val.shape[0]) * self.seq_len


# Fields that mean something for each kind; others must stay at their defaults.
_FIELDS = {
    "synthetic": set(),
    "files": {"path", "val_path", "text_field", "txt_unit", "val_fraction", "encoding", "encoding_errors"},
    "hub": {"name", "config", "revision", "split", "val_split", "text_field", "val_fraction"},
}


class DataSource(BaseModel):
    """Where CPT and validation text comes from (embeddable in a study YAML)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["synthetic", "files", "hub"] = Field(
        description="'synthetic': the built-in corpus; 'files': local files; 'hub': a streamed "
        "Hugging Face Hub dataset.")
    path: str | None = Field(None, description="kind=files: a .txt/.json/.jsonl/.parquet file, or "
                             "a folder searched recursively for them (one format per folder).")
    val_path: str | None = Field(None, description="kind=files: optional file or folder of "
                                 "held-out documents; without it val_fraction of path is held out.")
    name: str | None = Field(None, description="kind=hub: dataset id, e.g. 'HuggingFaceFW/fineweb-edu'.")
    config: str | None = Field(None, description="kind=hub: dataset config (subset), e.g. 'sample-10BT'.")
    revision: str | None = Field(None, description="kind=hub: git revision to pin, for reproducibility.")
    split: str = Field("train", description="kind=hub: split the training documents come from.")
    val_split: str | None = Field(None, description="kind=hub: the dataset's own held-out split "
                                  "(e.g. 'validation'); without it val_fraction of split is held out.")
    text_field: str = Field("text", description="JSON/Parquet/hub: the column holding the text.")
    txt_unit: Literal["paragraph", "line", "document"] = Field(
        "paragraph", description=".txt files: one document per blank-line-separated paragraph, "
        "per line, or per file.")
    encoding: str = Field("utf-8", description="kind=files, .txt/.json/.jsonl: the text encoding (e.g. "
                          "cp1252, utf-16, latin-1).")
    encoding_errors: Literal["strict", "replace", "ignore"] = Field(
        "strict", description="kind=files: bytes that are not valid in the encoding: strict (an error naming "
        "the file and byte offset), replace (with U+FFFD) or ignore (dropped).")
    # 5%: held-out budgets are a few % of the train budget, so little extra text is read. The
    # choice is per document, so the held-out rows do not change with train_tokens.
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of documents held out for "
                                "validation (by a seed-keyed hash of the text) when the source "
                                "names no held-out split or files.")

    @model_validator(mode="after")
    def _check_kind(self) -> DataSource:
        stray = [k for k in type(self).model_fields if k != "kind" and k not in _FIELDS[self.kind]
                 and getattr(self, k) != type(self).model_fields[k].default]
        if stray:
            raise ValueError(f"{', '.join(stray)}: not used by kind={self.kind}; remove")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"encoding {self.encoding!r} is not a known text encoding; use e.g. utf-8, "
                             "cp1252 or utf-16") from None
        if self.kind == "files" and not self.path:
            raise ValueError("kind=files needs path (a file or folder of text)")
        if self.kind == "hub" and not self.name:
            raise ValueError("kind=hub needs name (a Hugging Face dataset id)")
        default_fraction = type(self).model_fields["val_fraction"].default
        if (self.val_split or self.val_path) and self.val_fraction != default_fraction:
            raise ValueError("val_fraction is unused when val_split/val_path is given; remove it")
        if self.val_split is not None and self.val_split == self.split:
            raise ValueError(f"val_split equals split ({self.split!r}); name a held-out split")
        return self

    def describe(self) -> str:
        """A short human-readable name, e.g. ``hf:org/name:config[train]``."""
        if self.kind == "synthetic":
            return "synthetic"
        if self.kind == "files":
            return f"files:{self.path}" + (f" (val: {self.val_path})" if self.val_path else "")
        hub = f"hf:{self.name}" + (f":{self.config}" if self.config else "")
        return hub + f"[{self.split}" + (f", val={self.val_split}]" if self.val_split else "]")


def parse_source(text: str) -> DataSource:
    """Read ``"synthetic"``, ``"hf:org/name[:config]"`` or a local path (``./synthetic`` for a
    folder that happens to be called so) into a :class:`DataSource`."""
    text = str(text).strip()
    if text == "synthetic":
        return DataSource(kind="synthetic")
    if text.startswith("hf:"):
        name, _, config = text[3:].partition(":")
        if not name:
            raise UserError(f"data source {text!r} names no dataset; write hf:org/name or hf:org/name:config")
        return DataSource(kind="hub", name=name, config=config or None)
    if not text:
        raise UserError("empty data source; give 'synthetic', a local path, or hf:org/name")
    return DataSource(kind="files", path=text)


def load_packed(source: str | os.PathLike | DataSource, tokenizer, *, seq_len: int,
                train_tokens: int, val_tokens: int, seed: int = 0,
                cache_dir: Path | None = None, progress: bool = True) -> PackedData:
    """Packed train and validation rows of ``seq_len`` tokens from ``source``, cached on disk.

    Budgets are exact: ``train_tokens // seq_len`` train rows and ``val_tokens // seq_len``
    val rows (``val_tokens=0`` gives none). The trainer further rounds the train rows down to
    whole optimizer steps. The same source, tokenizer, sizes and ``seed`` give the same arrays;
    another seed gives another order (and, for held-out fractions, another held-out set).
    ``cache_dir`` defaults to ``ablate_home()/data``; a cache hit never calls the tokenizer.
    Raises :class:`UserError` when the source runs out of text or cannot be read.
    """
    if isinstance(source, os.PathLike):
        source = DataSource(kind="files", path=os.fspath(source))
    src = source if isinstance(source, DataSource) else parse_source(source)
    train_rows, val_rows = _check_budget(seq_len, train_tokens, val_tokens)
    if not 0 <= seed < 2**63:
        raise UserError(f"data seed {seed} is out of range; use an integer in [0, 2**63)")
    payload = {"version": CACHE_VERSION, "source": _source_fingerprint(src),
               "tokenizer": tokenizer_fingerprint(tokenizer), "seq_len": seq_len,
               "seed": seed, "train_rows": train_rows, "val_rows": val_rows}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    folder = Path(cache_dir if cache_dir is not None else ablate_home() / "data") / key
    if not (folder / "meta.json").is_file():
        _build_entry(folder, payload, src, tokenizer, seq_len, train_rows, val_rows, seed, progress)
    pool = np.load(folder / "train.npy", mmap_mode="r")
    val = np.load(folder / "val.npy", mmap_mode="r")
    return PackedData(train=pool[:train_rows], val=val[:val_rows], seq_len=seq_len, source=src.describe(),
                      pool=pool)


def _build_entry(folder: Path, payload: dict, src: DataSource, tokenizer, seq_len: int, train_rows: int,
                 val_rows: int, seed: int, progress: bool) -> None:
    """Pack one cache entry, once however many processes ask for it at the same time.

    A lock file per entry (``<cache>/../.<cache name>.locks/<key>.lock``, outside the cache so that
    holds only entries; an ``flock``, which the kernel drops when its holder dies, however it
    dies) makes a second process wait for the first and then load its result, instead of packing
    the same data again and meeting it at the final rename.
    """
    locks = folder.parent.with_name(f".{folder.parent.name}.locks")
    waiting = f"another process is packing {src.describe()} into {folder}; waiting for it" if progress else None
    with waiting_lock(locks / f"{folder.name}.lock", waiting):
        if (folder / "meta.json").is_file():  # built by the process we waited for
            return
        try:
            # overwrite only a folder left without meta.json (written by hand or by an old version)
            with atomic_dir(folder, overwrite=folder.exists()) as tmp:
                meta = _build(tmp, src, tokenizer, seq_len, train_rows, val_rows, seed, progress)
                atomic_write_json(tmp / "meta.json", {**payload, **meta, "describe": src.describe()})
        except FileExistsError:  # a writer without the lock (an older version) finished first: use theirs
            if not (folder / "meta.json").is_file():
                raise


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides token ids: the serialized fast tokenizer (or the vocab) and EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time settings that transformers toggles on the backend
        spec.pop("padding", None)
    else:
        spec = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([tokenizer.eos_token_id, spec], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_budget(seq_len: int, train_tokens: int, val_tokens: int) -> tuple[int, int]:
    if seq_len < 2:
        raise UserError(f"seq_len={seq_len} is too short for next-token training; use at least 2")
    if train_tokens < seq_len:
        raise UserError(f"train_tokens={train_tokens} is less than one row of seq_len={seq_len}; "
                        "raise train_tokens")
    if val_tokens < 0 or 0 < val_tokens < seq_len:
        raise UserError(f"val_tokens={val_tokens} gives no full row of seq_len={seq_len}; "
                        f"use 0 or at least {seq_len}")
    return train_tokens // seq_len, val_tokens // seq_len


def _source_fingerprint(src: DataSource) -> dict[str, Any]:
    """The source's settings plus what its content hangs on (file stats, the generator's code)."""
    out: dict[str, Any] = src.model_dump()
    for field in ("encoding", "encoding_errors"):  # absent at their defaults: older caches still hit
        if out[field] == type(src).model_fields[field].default:
            del out[field]
    if src.kind == "files":
        for field in ("path", "val_path"):
            if getattr(src, field):
                out[field + "_files"] = [(str(f), f.stat().st_size, f.stat().st_mtime_ns)
                                         for f in _resolve_files(getattr(src, field), field)]
    if src.kind == "synthetic":
        out["generator_sha256"] = hashlib.sha256(Path(synthetic.__file__).read_bytes()).hexdigest()
    return out


def _resolve_files(path: str, field: str = "path") -> list[Path]:
    """The corpus files under ``path`` (sorted), checked for existence, format and emptiness."""
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise UserError(f"data {field} {path!r} does not exist; fix the path or use 'synthetic'")
    if root.is_file():
        files = [root]
    else:
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS
                       and not any(p.startswith(".") for p in f.relative_to(root).parts))
        if not files:
            raise UserError(f"folder {path!r} holds no {'/'.join(BUILDERS)} files; "
                            "point the data path at a corpus")
    for f in files:
        if f.suffix.lower() not in BUILDERS:
            raise UserError(f"unsupported corpus file {f.name!r}; use one of {', '.join(BUILDERS)}")
        if f.stat().st_size == 0:
            raise UserError(f"corpus file {str(f)!r} is empty; remove it or fill it with text")
    builders = {BUILDERS[f.suffix.lower()] for f in files}
    if len(builders) > 1:
        raise UserError(f"folder {path!r} mixes formats ({', '.join(sorted(builders))}); "
                        "keep one format per folder")
    return files


def _local_texts(src: DataSource, path: str, field: str) -> Iterator[str]:
    import datasets  # lazy: heavy import, only needed for file and hub sources

    files = _resolve_files(path, field)
    builder = BUILDERS[files[0].suffix.lower()]
    kwargs = {"sample_by": src.txt_unit} if builder == "text" else {}
    if builder != "parquet":
        kwargs.update(encoding=src.encoding, encoding_errors=src.encoding_errors)
    ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                               streaming=True, **kwargs)
    texts = _readable(_column(ds, "text" if builder == "text" else src.text_field, path), src, files, builder)
    return (t.strip("\n") for t in texts) if builder == "text" else texts


def _readable(texts: Iterator[str], src: DataSource, files: list[Path], builder: str) -> Iterator[str]:
    """``texts``, with a decoding or parsing failure of the reader as one line naming the file and where."""
    try:
        yield from texts
    except UserError:
        raise
    except UnicodeError:
        raise UserError(_bad_bytes(files, src.encoding) or f"{files[0].parent}: not valid {src.encoding} text; set "
                        "the data source's encoding, or encoding_errors: replace") from None
    except Exception as exc:  # noqa: BLE001 - the datasets/pyarrow readers raise many kinds
        where = _bad_json_line(files) if builder == "json" else None
        raise UserError(where or f"cannot read {files[0] if len(files) == 1 else files[0].parent}: "
                        f"{one_line(exc, 200)}; fix the file or use another data path") from None


def _bad_bytes(files: list[Path], encoding: str) -> str | None:
    """The first file and byte offset not valid in ``encoding``, as a message (read only on failure)."""
    for f in files:
        decoder, offset = codecs.getincrementaldecoder(encoding)("strict"), 0
        with open(f, "rb") as stream:
            while chunk := stream.read(1 << 20):
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exc:
                    at = offset + exc.start
                    return (f"{f}: byte {at:,} (0x{chunk[exc.start]:02x}) is not valid {encoding}; set the data "
                            "source's encoding (e.g. cp1252, utf-16) or encoding_errors: replace")
                offset += len(chunk)
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                return (f"{f}: ends inside a {encoding} character; set the data source's encoding or "
                        "encoding_errors: replace")
    return None


def _bad_json_line(files: list[Path]) -> str | None:
    """The first .jsonl line that is not a JSON value, as a message."""
    for f in files:
        if f.suffix.lower() != ".jsonl":
            continue
        with open(f, "rb") as stream:
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"{f}: line {number:,} is not valid JSON ({first_line(exc)}); fix or remove that line"
    return None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any(v in {"1", "ON", "YES", "TRUE"} for v in env)


def _hub_texts(src: DataSource, split: str) -> Iterator[str]:
    import datasets

    where = f"hub dataset {src.name!r}"
    fix = "run where the network is reachable, or download the data and give its local path"
    if _hub_offline():
        raise UserError(f"cannot reach the Hugging Face Hub for {where}: offline mode "
                        f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) is set; {fix}")
    try:
        ds = datasets.load_dataset(src.name, src.config, split=split, revision=src.revision,
                                   streaming=True)
        yield from _column(ds, src.text_field, where)
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Hugging Face Hub for {where} ({one_line(exc)}); "
                        f"{fix}") from exc
    except (datasets.exceptions.DatasetNotFoundError, ValueError) as exc:
        raise UserError(f"cannot open {where} (config {src.config!r}, split {split!r}): "
                        f"{one_line(exc)}; check the name, config, split and access (HF_TOKEN)") from exc


def _column(ds, field: str, where: str) -> Iterator[str]:
    """The non-empty strings of column ``field``, read in batches."""
    if ds.column_names is not None and field not in ds.column_names:
        raise UserError(f"{where} has no field {field!r} (fields: {', '.join(ds.column_names)}); "
                        "set text_field to the one holding the text")
    for batch in ds.select_columns([field]).iter(batch_size=BATCH_DOCS):
        for text in batch[field]:
            if text is not None and not isinstance(text, str):
                raise UserError(f"{where} field {field!r} holds {type(text).__name__}, not text; "
                                "set text_field to a string column")
            if text and not text.isspace():
                yield text


def _streams(src: DataSource, seed: int) -> tuple[Iterable[str], Iterable[str] | None]:
    """(train documents, val documents); val is None when it is held out of the train stream."""
    if src.kind == "synthetic":
        return iter_documents("train", seed=seed), iter_documents("val", seed=seed)
    if src.kind == "files":
        train = _local_texts(src, src.path, "path")
        return train, (_local_texts(src, src.val_path, "val_path") if src.val_path else None)
    return _hub_texts(src, src.split), (_hub_texts(src, src.val_split) if src.val_split else None)


def _is_val(text: str, seed: int, fraction: float) -> bool:
    """Deterministic held-out choice: a seed-keyed hash of the text, uniform in [0, 1)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < fraction


class _Rows:
    """Fills a memory-mapped int32 array with packed rows of ``seq_len`` tokens, shuffled within windows.

    Prefix-stable by design (the budget axis needs it: a run of b tokens must see the first b
    tokens of a longer run): the packed rows are shuffled within consecutive windows of
    SHUFFLE_WINDOW rows, window w by its own permutation (a generator keyed by (seed, side, w)), so
    the first r rows are the same whatever the total. A whole-array permutation, as before, changed
    every row with the budget. The last window is read whole when the text allows (at most
    SHUFFLE_WINDOW - 1 rows more than asked), and the file keeps every row read: the asked rows are
    its first ``rows``, and a study's repeats reorder rows within whole windows (``train.row_order``).
    When the text ends inside the last window, that window's rows move up in the order of their
    shuffled places (a valid shuffle, just not prefix-stable inside that one window).
    """

    def __init__(self, path: Path, rows: int, seq_len: int, key: tuple[int, int]):
        self.path, self.rows, self.seq_len, self.key = path, rows, seq_len, key
        self.capacity = -(-rows // SHUFFLE_WINDOW) * SHUFFLE_WINDOW  # whole windows
        self.scratch = path.with_name(path.name + ".part")
        self.out = np.lib.format.open_memmap(self.scratch, mode="w+", dtype=np.int32, shape=(self.capacity, seq_len))
        self.last = self.capacity - SHUFFLE_WINDOW  # the last window's first row
        self.tail: list[int] = []  # places filled in the last window
        self.pending = np.empty(0, np.int32)
        self.filled = self.tokens = self.docs = 0

    @property
    def full(self) -> bool:
        """Every row of every window packed: nothing more to read."""
        return self.filled == self.capacity

    @property
    def enough(self) -> bool:
        """At least ``rows`` rows packed."""
        return self.filled >= self.rows

    def places(self, start: int, count: int) -> np.ndarray:
        """Shuffled places of packed rows ``start .. start + count`` (all in one window)."""
        w, j = divmod(start, SHUFFLE_WINDOW)
        perm = np.random.default_rng([*self.key, w]).permutation(SHUFFLE_WINDOW)
        return w * SHUFFLE_WINDOW + perm[j:j + count]

    def add(self, tokens: np.ndarray, docs: int) -> int:
        """Append a token stream; returns how many tokens went into rows."""
        self.tokens += tokens.size
        self.docs += docs
        buf = np.concatenate([self.pending, tokens])
        k = min(buf.size // self.seq_len, self.capacity - self.filled)
        rows = buf[:k * self.seq_len].reshape(k, self.seq_len)
        done = 0
        while done < k:  # window by window
            count = min(k - done, SHUFFLE_WINDOW - (self.filled % SHUFFLE_WINDOW))
            places = self.places(self.filled, count)
            self.out[places] = rows[done:done + count]
            if self.filled >= self.last:
                self.tail.extend(places.tolist())
            self.filled += count
            done += count
        self.pending = buf[k * self.seq_len:] if not self.full else buf[:0]
        return k * self.seq_len

    def finish(self) -> None:
        """Write ``path``: every row read (the last window compacted when the text ended inside it)."""
        if self.full:
            self.out.flush()
            del self.out
            os.replace(self.scratch, self.path)
            return
        places = sorted(self.tail)
        self.out[self.last:self.last + len(places)] = self.out[places]
        final = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.int32, shape=(self.filled, self.seq_len))
        for i in range(0, self.filled, SHUFFLE_WINDOW):
            final[i:i + SHUFFLE_WINDOW] = self.out[i:min(i + SHUFFLE_WINDOW, self.filled)]
        final.flush()
        del self.out, final
        os.unlink(self.scratch)


def _encode(tokenizer, texts: list[str], eos: int, ends: list[bool] | None = None) -> np.ndarray:
    """Batch-tokenize and join, with EOS after every document (after each text whose ``ends`` is true)."""
    ids = tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    bounds = np.cumsum([len(x) for x in ids])
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(bounds[-1]))
    return np.insert(flat, bounds if ends is None else bounds[np.asarray(ends, dtype=bool)], eos)


def pieces(text: str, size: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in consecutive pieces of at most about ``size`` characters, each cut just before a
    whitespace character where there is one in the piece's second half (so a word is not split and
    byte-level BPE sees the same words), else at ``size``. Joined, the pieces are ``text``."""
    start = 0
    while len(text) - start > size:
        cut = start + size
        space = max(text.rfind(c, start + size // 2, cut) for c in " \n\t")
        cut = space if space > start else cut
        yield text[start:cut]
        start = cut
    yield text[start:]


def _fill(writers: list[_Rows], docs: Iterable[tuple[int, str]], tokenizer, eos: int, bar) -> None:
    """Route (side, text) documents into ``writers[side]`` until every fed side is full."""
    fed = {side for side, w in enumerate(writers) if not w.full}
    pending: dict[int, list[str]] = {side: [] for side in fed}
    ends: dict[int, list[bool]] = {side: [] for side in fed}
    chars = dict.fromkeys(fed, 0)

    def flush(side: int) -> None:
        if pending[side] and not writers[side].full:
            tokens = _encode(tokenizer, pending[side], eos, ends[side])
            bar.update(writers[side].add(tokens, sum(ends[side])))
        pending[side], ends[side], chars[side] = [], [], 0

    for side, text in docs:
        if writers[side].full:
            if all(writers[s].full for s in fed):
                return
            continue
        parts = list(pieces(text, PIECE_CHARS)) if len(text) > PIECE_CHARS else [text]
        for i, part in enumerate(parts):
            if writers[side].full:
                break
            pending[side].append(part)
            ends[side].append(i == len(parts) - 1)  # EOS after the document's last piece only
            chars[side] += len(part)
            if len(pending[side]) >= BATCH_DOCS or chars[side] >= BATCH_CHARS:
                flush(side)
    for side in fed:
        flush(side)


def _build(tmp: Path, src: DataSource, tokenizer, seq_len: int, train_rows: int, val_rows: int,
           seed: int, progress: bool) -> dict[str, Any]:
    """Write train.npy and val.npy into ``tmp``; returns statistics for meta.json."""
    from tqdm.auto import tqdm

    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no eos_token; set tokenizer.eos_token before packing")
    # one shuffle stream per side, so the val rows do not depend on the train budget
    writers = [_Rows(tmp / "train.npy", train_rows, seq_len, (seed, 0)),
               _Rows(tmp / "val.npy", val_rows, seq_len, (seed, 1))]
    start = time.perf_counter()
    train_docs, val_docs = _streams(src, seed)
    with tqdm(total=sum(w.capacity for w in writers) * seq_len, unit="tok", unit_scale=True, delay=2,
              disable=not progress, desc=f"packing {src.describe()}") as bar:
        if val_docs is None:
            routed = ((int(_is_val(t, seed, src.val_fraction)), t) for t in train_docs)
            _fill(writers, routed, tokenizer, eos, bar)
        else:
            _fill(writers[:1], ((0, t) for t in train_docs), tokenizer, eos, bar)
            _fill(writers, ((1, t) for t in val_docs), tokenizer, eos, bar)
    _check_enough(src, writers, seq_len)
    for w in writers:
        w.finish()
    return {"train_documents_read": writers[0].docs, "val_documents_read": writers[1].docs,
            "seconds": round(time.perf_counter() - start, 3)}


def _check_enough(src: DataSource, writers: list[_Rows], seq_len: int) -> None:
    problems = []
    for w, name in zip(writers, ("train", "val"), strict=True):
        if not w.enough:
            most = w.tokens // seq_len * seq_len
            # "lower val_tokens to at most 0" is no fix: with less than one row, only more text helps
            fix = f"lower {name}_tokens to at most {most:,}" if most else \
                f"that is less than one row of seq_len={seq_len}: lower seq_len"
            if name == "val" and src.kind != "synthetic" and not (src.val_split or src.val_path):
                fix += " or raise val_fraction"
            problems.append(f"{w.tokens:,} {name} tokens (incl. EOS) for {name}_tokens="
                            f"{w.rows * seq_len:,}; {fix}")
    if problems:
        raise UserError(f"{src.describe()} ran out of text: it holds only "
                        f"{' and '.join(problems)}, or use a larger corpus")
