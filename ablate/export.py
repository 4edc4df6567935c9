"""Streaming checkpoint export shared by ``ablate.upscale`` and ``ablate.moe``.

A variant is written by copying byte ranges from the source's safetensors shards into
new shards, under new tensor names, without ever materialising a tensor: peak memory
is a fixed copy buffer plus the interpreter, whatever the checkpoint's size. The
``safetensors`` library has no incremental writer (``save_file`` needs every tensor of a
shard in memory), so the file format is written here: an 8-byte little-endian header
length, a JSON header of dtypes, shapes and byte offsets, then the raw tensor bytes.

The output folder appears only when complete (:func:`ablate.fsutil.atomic_dir`).
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ablate import base as bases
from ablate.errors import UserError, first_line
from ablate.fsutil import atomic_dir, atomic_write_json, check_writable
from ablate.plan import Plan, solar

__all__ = [
    "Source", "TensorRef", "TensorBytes", "TensorZeros", "resolve_source", "load_config", "renamed_tensors",
    "write_checkpoint", "mergekit_passthrough_yaml", "mergekit_plan_yaml", "parse_size",
]

COPY_CHUNK = 16 * 2**20  # bytes per read when copying a tensor: bounds peak memory
MAX_HEADER = 100 * 2**20  # the safetensors library's own bound on a header's size
# Files of a source checkpoint that a variant must not inherit: weights, their index,
# the config (rewritten) and our own records (rewritten).
SKIP_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack)$|"
                        r"^(config\.json|model\.safetensors\.index\.json|ablate\.json|mergekit\.yaml)$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class TensorRef:
    """A tensor stored in a safetensors file: ``[start, end)`` bytes from the file's start."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class TensorBytes:
    """A new tensor given as raw little-endian bytes (for example a fresh MoE router)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @property
    def nbytes(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class TensorZeros:
    """A tensor of zeros (a zero-output layer's projection), written in chunks: never held in memory.

    Zero bytes are 0.0 in every floating-point format safetensors stores (IEEE and bfloat16)."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Source:
    """A local checkpoint folder and the byte location of every tensor in its shards."""

    folder: Path
    tensors: dict[str, TensorRef]


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    """The tensors of one safetensors file, located by byte range, each checked to lie inside the file.

    Read by hand rather than with ``safetensors.safe_open``, which does not expose where a
    tensor's bytes are; the streaming copy needs exactly that.
    """
    bad = f"{path} is not a safetensors file"
    fix = "; download or convert the checkpoint again"
    size_on_disk = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{bad} (too short){fix}")
        (size,) = struct.unpack("<Q", raw)
        if size > size_on_disk - 8 or size > MAX_HEADER:
            raise UserError(f"{bad} (its header claims {size:,} bytes, the file has {size_on_disk:,}){fix}")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{bad} (bad header){fix}") from None
    base = 8 + size
    out = {}
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = (base + int(x) for x in info["data_offsets"])
            out[name] = TensorRef(path, str(info["dtype"]), tuple(int(d) for d in info["shape"]), start, end)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise UserError(f"{bad} (a header entry without dtype, shape and data_offsets){fix}") from None
    outside = [n for n, t in out.items() if not base <= t.start <= t.end <= size_on_disk]
    if outside:
        raise UserError(f"{path} is truncated: tensor {outside[0]} runs past the end of the file{fix}")
    return out


def resolve_source(src: str) -> Source:
    """A local checkpoint folder (or a hub id, downloaded when online) and its safetensors tensors.

    The weight files are the ones :func:`ablate.base.weight_files` allows: ``model.safetensors``
    or the shards its index names, all present; nothing pickled is ever read.
    """
    path = Path(src).expanduser()
    if not path.exists() and not src.startswith((".", "/", "~")) and bases.HUB_ID.match(src):
        path = _download(src)
    bases.read_config_dict(path)
    tensors: dict[str, TensorRef] = {}
    for file in bases.weight_files(path):
        tensors.update(read_safetensors_header(file))
    return Source(path, tensors)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download  # lazy: only a hub id needs the network client

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated: all one answer for the user
        raise UserError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({first_line(exc)}); check the name or download it and pass the folder"
        ) from None


def load_config(source: Source, *, supported: Iterable[str] | None = None):
    """The source's transformers config, checked against its tensors; an unsupported architecture,
    a config that asks for the model's own code, or weights that do not cover the config are UserErrors."""
    raw = bases.read_config_dict(source.folder)
    model_type = raw.get("model_type")
    if supported is not None and model_type not in supported:
        raise UserError(
            f"{source.folder} is a {model_type!r} model; supported architectures: {', '.join(supported)}"
        )
    config = bases.model_config(bases.BaseRef(str(source.folder), "local", str(source.folder)))
    if not any(name.startswith("model.layers.") for name in source.tensors):
        raise UserError(
            f"{source.folder} ({model_type}) has no model.layers.* tensors; only decoder-only "
            "causal LMs in the Llama layout are supported"
        )
    bases.check_coverage(source.folder, config, set(source.tensors))
    return config


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def renamed_tensors(source: Source, rename: Callable[[str], list[str]],
                    zeroed: Callable[[str], bool] | None = None) -> dict[str, TensorRef | TensorZeros]:
    """Map each source tensor to zero or more output names, ordered naturally by name; an output name
    for which ``zeroed(new_name)`` is true gets zeros of the source tensor's dtype and shape."""
    out: dict[str, TensorRef | TensorZeros] = {}
    for name, ref in source.tensors.items():
        for new in rename(name):
            out[new] = TensorZeros(ref.dtype, ref.shape, ref.nbytes) if zeroed is not None and zeroed(new) else ref
    return dict(sorted(out.items(), key=lambda item: _natural_key(item[0])))


def parse_size(text: str) -> int:
    """``"2GB"`` -> bytes (decimal units, as Hugging Face's ``max_shard_size``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(text).upper())
    if not match:
        raise UserError(f"shard size {text!r} is not a size like 500MB or 2GB")
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match.group(2)]
    return int(float(match.group(1)) * scale)


def _plan_shards(tensors: dict, max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += t.nbytes
    return shards


def _write_shard(path: Path, names: list[str], tensors: dict, bar) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as safetensors does
    handles: dict[Path, object] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for name in names:
                t = tensors[name]
                if isinstance(t, TensorBytes):
                    out.write(t.data)
                elif isinstance(t, TensorZeros):
                    for start in range(0, t.nbytes, COPY_CHUNK):
                        out.write(bytes(min(COPY_CHUNK, t.nbytes - start)))
                else:
                    f = handles.get(t.file) or handles.setdefault(t.file, open(t.file, "rb"))
                    f.seek(t.start)
                    left = t.nbytes
                    while left:
                        chunk = f.read(min(COPY_CHUNK, left))
                        if not chunk:
                            raise UserError(f"{t.file} is truncated: tensor {name} runs past its end")
                        out.write(chunk)
                        left -= len(chunk)
                bar.update(t.nbytes)
    finally:
        for f in handles.values():
            f.close()


def _check_out(out: Path, source: Path, force: bool) -> None:
    """``out`` may be written: new, or (with ``force``) a previous export and nothing else.

    ``--force`` replaces the whole folder, so it must never be the source, inside it or above
    it (replacing a folder that holds the source deletes the source), nor a folder that holds
    anything but an export of ours: ``ablate.json`` and files only, no subfolders.
    """
    target, src = out.resolve(), source.resolve()
    if target == src or target in src.parents or src in target.parents:
        where = "is" if target == src else "contains" if target in src.parents else "is inside"
        raise UserError(f"output folder {out} {where} the source checkpoint {source}; choose another --out")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise UserError(f"output folder {out} already exists; choose another --out or pass --force")
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder; choose another --out")
    try:
        record = json.loads((out / "ablate.json").read_bytes())
        ours = isinstance(record, dict) and "method" in record
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        ours = False
    if not ours or any(p.is_dir() or p.is_symlink() for p in out.iterdir()):
        raise UserError(f"output folder {out} exists and is not an earlier export (--force replaces only those: "
                        "a folder with ablate.json and no subfolders); choose another --out")


def write_checkpoint(source: Source, out: str | os.PathLike, config, tensors: dict, *,
                     extra_files: dict[str, str] | None = None, record: dict | None = None,
                     force: bool = False, max_shard_size: str = "2GB", progress: bool = True) -> Path:
    """Write a complete HF checkpoint: config, safetensors shards (+ index), tokenizer files.

    Small files of the source (tokenizer, generation config, chat template) are copied.
    ``extra_files`` are written as text; ``record`` becomes ``ablate.json``.
    """
    out = Path(out).expanduser()
    max_bytes = parse_size(max_shard_size)
    _check_out(out, source.folder, force)
    check_writable(out.parent)  # really creates and removes a folder: os.access says yes to root on /proc
    shards = _plan_shards(tensors, max_bytes)
    total = sum(t.nbytes for t in tensors.values())
    try:
        with atomic_dir(out, overwrite=force) as tmp:
            config.save_pretrained(tmp)
            weight_map: dict[str, str] = {}
            with tqdm(total=total, unit="B", unit_scale=True, desc="writing shards", disable=not progress) as bar:
                for k, names in enumerate(shards, 1):
                    many = len(shards) > 1
                    fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors" if many else "model.safetensors"
                    _write_shard(tmp / fname, names, tensors, bar)
                    weight_map.update(dict.fromkeys(names, fname))
            if len(shards) > 1:
                atomic_write_json(tmp / "model.safetensors.index.json",
                                  {"metadata": {"total_size": total}, "weight_map": weight_map})
            for item in sorted(source.folder.iterdir()):
                if item.is_file() and not SKIP_FILES.search(item.name):
                    shutil.copy2(item, tmp / item.name)
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            if record is not None:
                atomic_write_json(tmp / "ablate.json", record)
    except PermissionError as exc:
        raise UserError(f"cannot write {out}: permission denied ({exc.filename}); choose another --out") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"no space left on the device while writing {out}; free space or choose another --out") \
                from None
        raise
    return out


def mergekit_passthrough_yaml(src: str, n: int, m: int, config) -> str:
    """mergekit ``passthrough`` recipe for DUS(src, m): ``mergekit-yaml mergekit.yaml OUT``."""
    return mergekit_plan_yaml(src, solar(m).plan(n), config)


# mergekit's passthrough multiplies every tensor whose name contains a filter by its scale: zero for
# the projections a zero-output layer zeroes (weights and biases), one for the rest of the slice.
ZERO_OUTPUT_SCALE = {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0},
                               {"value": 1.0}]}


def mergekit_plan_yaml(src: str, plan: Plan, config) -> str:
    """mergekit ``passthrough`` recipe for ``plan`` applied to ``src``: ``mergekit-yaml mergekit.yaml OUT``.

    One slice per run of consecutive base layers; a run of zero-output layers carries
    ``parameters: scale`` with ``o_proj`` and ``down_proj`` at 0 (how mergekit builds LLaMA Pro-style
    blocks). Every plan of :mod:`ablate.plan` can be written this way.
    """
    import yaml

    slices = []
    for a, b, zero in plan.slices():
        source = {"model": src, "layer_range": [a, b]}
        if zero:
            source["parameters"] = copy.deepcopy(ZERO_OUTPUT_SCALE)  # a copy each: no YAML anchors in the file
        slices.append({"sources": [source]})
    doc = {"slices": slices, "merge_method": "passthrough", "dtype": _dtype_name(config)}
    head = (f"# {plan.name or 'layer plan'} of {src}: n={plan.n} -> s={len(plan)} layers. "
            "Rebuild: mergekit-yaml mergekit.yaml OUT\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def _dtype_name(config) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return str(dtype).removeprefix("torch.")

