"""Base models: the one place a base spec is resolved, validated and loaded.

A *spec* is what a user writes for a base: a zoo name (``llama-4l``), a local Hugging Face
checkpoint folder, or a hub id (``org/name``). :func:`resolve` says which it is and where it
lives, without reading weights; :func:`inspect` reads and validates its config (and, for a
folder, its weight files); :func:`load` returns ``(model, tokenizer)``. Every command and the
study go through these functions, so the safety rules hold everywhere at once:

- weights load from ``.safetensors`` files only, and only from the files transformers would
  read (``model.safetensors``, or the shards an index names, each of which must exist and be a
  ``.safetensors`` file): a pickled ``.bin`` can run code when loaded, also when an index
  points at it beside some unrelated ``.safetensors`` file;
- the weights must cover the config: every tensor the architecture needs is in the files (a
  missing shard or a config listing more layers than the weights would otherwise leave layers
  randomly initialised, with only transformers' load report on stderr to tell);
- code shipped with a model runs only when the caller passes ``trust_remote_code=True``; a
  config that asks for its own code (``auto_map``) is refused otherwise, before transformers
  sees it.

Every problem a user can fix is a one-line :class:`~ablate.errors.UserError`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ablate import zoo
from ablate.errors import UserError, first_line

__all__ = ["BaseRef", "BaseInfo", "HUB_ID", "MOE_FAMILIES", "resolve", "read_config_dict", "weight_files",
           "tensor_names", "check_coverage", "model_config", "depth", "inspect", "load", "load_causal_lm",
           "load_tokenizer", "tokenizer_for", "is_local_checkpoint"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"
MOE_FAMILIES = ("llama", "mistral")  # dense families whose MLPs map onto Mixtral's experts (ablate.moe)
ARCH_FIX = "use a decoder-only causal LM whose layers are model.model.layers, such as llama, mistral or qwen2"


@dataclass(frozen=True)
class BaseRef:
    """Where a base spec lives: ``kind`` is ``zoo``, ``local`` or ``hub``; ``location`` its folder or hub id."""

    spec: str
    kind: Literal["zoo", "local", "hub"]
    location: str

    @property
    def folder(self) -> Path | None:
        """The checkpoint folder (a zoo model's exists once built); None for a hub id."""
        return None if self.kind == "hub" else Path(self.location)


@dataclass(frozen=True)
class BaseInfo:
    """A validated base: where it is, its transformers config (None for a zoo model: its spec says) and its
    number of decoder layers."""

    ref: BaseRef
    config: object | None
    depth: int


def _looks_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or spec.startswith((".", "/", "~"))


def is_local_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a ``config.json``."""
    p = Path(path).expanduser()
    return p.is_dir() and (p / "config.json").is_file()


def resolve(spec: str) -> BaseRef:
    """What ``spec`` names: a zoo model, a local checkpoint folder (checked to be one) or a hub id.

    A local folder wins over a zoo name of the same spelling only when it is a checkpoint.
    """
    spec = str(spec)
    if spec in zoo.ZOO and not is_local_checkpoint(spec):
        return BaseRef(spec, "zoo", str(zoo.zoo_dir(spec)))
    if _looks_local(spec):
        folder = Path(spec).expanduser()
        read_config_dict(folder)  # exists, is a folder, has a readable config.json: one line each
        return BaseRef(spec, "local", str(folder))
    if HUB_ID.match(spec):
        return BaseRef(spec, "hub", spec)
    raise UserError(f"unknown base model {spec!r}: not a zoo model ({', '.join(zoo.ZOO)}), "
                    "a local checkpoint folder, or a hub id like org/name")


def read_config_dict(path: str | os.PathLike) -> dict:
    """The raw ``config.json`` of a local checkpoint folder, with one-line errors."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist; give a local checkpoint folder or a hub id")
    if not p.is_dir():
        raise UserError(f"{p} is not a folder; a checkpoint is a folder with config.json")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UserError(f"{p} is not a Hugging Face checkpoint: it has no config.json")
    try:
        raw = json.loads(cfg.read_bytes())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{cfg} is not text (not UTF-8 JSON); restore the checkpoint's config.json") from None
    if not isinstance(raw, dict):
        raise UserError(f"{cfg} holds a JSON {type(raw).__name__}, not an object; restore the checkpoint's config")
    return raw


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The ``.safetensors`` files transformers reads for this folder, all checked to exist.

    ``model.safetensors`` if present, else the shards ``model.safetensors.index.json`` names. Any
    other file is never read, whatever it is called: a folder with pickled weights only (or an
    index naming a pickle) is refused with a way out.
    """
    folder = Path(folder).expanduser()
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_bytes())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map of tensor -> file); "
                            "restore it from the checkpoint") from None
        bad = [n for n in names if not isinstance(n, str) or not n.endswith(".safetensors") or Path(n).name != n]
        if bad:
            raise UserError(f"{index} points at {bad[0]!r}, which is not a safetensors file in the folder; only "
                            "safetensors weights load (pickled weights can run code): convert the checkpoint "
                            "(model.save_pretrained(folder, safe_serialization=True))")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UserError(f"{folder}: shard {missing[0]} named by {INDEX} is missing "
                            f"({len(missing)} of {len(names)} shards); download the checkpoint again")
        return [folder / n for n in names]
    if any(p.suffix in PICKLED for p in folder.iterdir()):
        raise UserError(f"{folder} holds only pickled weights (.bin), which can run code when loaded; convert "
                        "them to safetensors (model.save_pretrained(folder, safe_serialization=True))")
    raise UserError(f"{folder} has a config.json but no model.safetensors (nor a {INDEX})")


def tensor_names(files: list[Path]) -> set[str]:
    """Names of the tensors in safetensors ``files`` (headers only, through the safetensors library)."""
    from safetensors import SafetensorError, safe_open

    names: set[str] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names.update(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{file} is not a readable safetensors file ({first_line(exc)}); "
                            "download the checkpoint again") from None
    return names


def check_coverage(where: str | os.PathLike, config, names: set[str]) -> None:
    """Every tensor ``config``'s architecture needs must be among ``names``, else one line says which.

    For families whose files use the model's own tensor names (llama, mistral, qwen2, ...) the
    check is exact, against the module tree built on the meta device. For families transformers
    renames on load (Mixtral's experts), each decoder layer below ``num_hidden_layers`` must have
    tensors and none above it, plus the embeddings.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    n = _num_layers(config)
    layer_ids = {int(m.group(1)) for name in names if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    absent = [i for i in range(n) if i not in layer_ids]
    if absent:
        raise UserError(f"{where}: the config has {n} layers but the weights have no tensors for layer"
                        f"{'s' * (len(absent) > 1)} {_ranges(absent)}; they would start random. Use the config "
                        "saved with these weights, or restore the missing shard")
    extra = sorted(i for i in layer_ids if i >= n)
    if extra:
        raise UserError(f"{where}: the weights have layers up to {extra[-1]} but the config only {n} "
                        "(num_hidden_layers); use the config saved with these weights")
    if get_checkpoint_conversion_mapping(config.model_type) is not None:
        if "model.embed_tokens.weight" not in names:
            raise UserError(f"{where}: the weights lack model.embed_tokens.weight; restore the missing shard")
        return
    expected = _expected_tensors(config)
    missing = sorted(expected - names, key=_natural)
    if missing:
        raise UserError(f"{where}: the weights lack {len(missing)} tensor{'s' * (len(missing) > 1)} the config "
                        f"needs (e.g. {', '.join(missing[:3])}); they would start random. Restore the missing "
                        "shard or use the config saved with these weights")


def _expected_tensors(config) -> set[str]:
    """Persistent tensors of ``config``'s causal LM, less the ones tied to another."""
    import torch
    from transformers import AutoModelForCausalLM

    with _quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = set(model.state_dict())
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if getattr(config, "tie_word_embeddings", False) or (hasattr(config, "get_text_config") and
                                                          getattr(config.get_text_config(), "tie_word_embeddings",
                                                                  False)):
        names -= set(tied) if isinstance(tied, (dict, list, set, tuple)) else set()
        names.discard("lm_head.weight")
    return names


def _num_layers(config) -> int:
    n = getattr(config, "num_hidden_layers", None)
    if n is None and hasattr(config, "get_text_config"):
        n = getattr(config.get_text_config(), "num_hidden_layers", None)
    if n is None:
        raise UserError(f"a {config.model_type!r} config has no num_hidden_layers; {ARCH_FIX}")
    if int(n) < 1:
        raise UserError(f"the config has num_hidden_layers={n}; a base needs at least one decoder layer")
    return int(n)


def _ranges(ids: list[int]) -> str:
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 and ids[-1] - ids[0] == len(ids) - 1 else \
        ", ".join(map(str, ids[:8])) + (", ..." if len(ids) > 8 else "")


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _quiet_transformers:
    """transformers' own warnings off for a block (meta-device builds warn about uninitialised weights)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._verbosity)


def _refuse_remote_code(where: str, raw: dict, trust_remote_code: bool) -> None:
    if raw.get("auto_map") and not trust_remote_code:
        raise UserError(f"base {where} ships its own model code (auto_map in config.json), which runs when loaded; "
                        "set trust_remote_code: true in the study and pass --trust-remote-code to allow it, or use "
                        "an architecture transformers ships")


def model_config(ref: BaseRef | str, *, trust_remote_code: bool = False):
    """The transformers config of a base, with one-line errors (a zoo model's is built from its spec)."""
    from transformers import AutoConfig

    ref = ref if isinstance(ref, BaseRef) else resolve(ref)
    if ref.kind == "zoo":
        if is_local_checkpoint(ref.location):
            return AutoConfig.from_pretrained(ref.location)
        return zoo.model_config(zoo.ZOO[ref.spec], len(zoo.zoo_tokenizer()))  # what the build will make
    if ref.kind == "local":
        raw = read_config_dict(ref.location)
        _refuse_remote_code(ref.spec, raw, trust_remote_code)
        try:
            return AutoConfig.from_pretrained(ref.location, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError, TypeError, OSError):
            import transformers

            raise UserError(f"base {ref.spec}: transformers {transformers.__version__} does not know the "
                            f"architecture {raw.get('model_type')!r}; {ARCH_FIX}") from None
    try:
        return AutoConfig.from_pretrained(ref.location, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline, gated, unknown, remote code refused: all one answer for the user
        raise UserError(f"cannot read the config of base model {ref.spec!r}: {first_line(exc)}") from None


def depth(spec: str, *, trust_remote_code: bool = False) -> int:
    """Number of decoder layers of a base, without loading its weights."""
    ref = resolve(spec)
    if ref.kind == "zoo":
        return zoo.ZOO[spec].num_layers
    if ref.kind == "local":
        raw = read_config_dict(ref.location)
        n = raw.get("num_hidden_layers", raw.get("text_config", {}).get("num_hidden_layers"))
        if n is None:
            raise UserError(f"{spec}: config.json has no num_hidden_layers; is it a decoder-only causal LM?")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise UserError(f"{spec}: config.json has num_hidden_layers={n!r}; a base needs at least one decoder "
                            "layer")
        return n
    return _num_layers(model_config(ref, trust_remote_code=trust_remote_code))


def _check_architecture(ref: BaseRef, config, *, moe: bool, trust_remote_code: bool) -> None:
    """The base must build as a causal LM with ``model.model.layers`` (what DUS cuts and stacks)."""
    import torch
    from transformers import AutoModelForCausalLM

    kind = config.model_type
    try:
        with _quiet_transformers(), torch.device("meta"):  # the module tree only: no memory, no weights read
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"base {ref.spec}: a {kind!r} model is not a causal LM ablate can build "
                        f"({first_line(exc)}); {ARCH_FIX}") from None
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers, "__len__"):
        raise UserError(f"base {ref.spec}: unsupported architecture {kind!r} ({type(model).__name__} has no "
                        f"model.model.layers); {ARCH_FIX}")
    if moe and kind not in MOE_FAMILIES:
        raise UserError(f"base {ref.spec}: the MoE upcycle supports {', '.join(MOE_FAMILIES)} models, not {kind!r}; "
                        "set moe: false for this base")


def inspect(spec: str, *, trust_remote_code: bool = False, moe: bool = False) -> BaseInfo:
    """Resolve and validate a base without loading its weights; ``moe`` when it takes part in the MoE arm.

    A local folder's weight files are read (headers only) and must cover its config. A zoo model
    that is not built yet is checked from its spec (the build makes what the spec says).
    """
    ref = resolve(spec)
    if ref.kind == "zoo":  # its config exists once built; the spec says what the build makes
        return BaseInfo(ref, None, zoo.ZOO[spec].num_layers)
    config = model_config(ref, trust_remote_code=trust_remote_code)
    n = _num_layers(config)
    _check_architecture(ref, config, moe=moe, trust_remote_code=trust_remote_code)
    if ref.kind == "local":
        check_coverage(ref.spec, config, tensor_names(weight_files(ref.location)))
    return BaseInfo(ref, config, n)


def load_tokenizer(spec: str | os.PathLike, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with one-line errors."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(spec), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot load a tokenizer from {str(spec)!r}: {first_line(exc)}") from None


def tokenizer_for(spec: str, *, trust_remote_code: bool = False):
    """The tokenizer a trial will use for ``spec``, without loading (or building) the model."""
    ref = resolve(spec)
    if ref.kind == "zoo":
        return load_tokenizer(ref.location) if zoo.is_built(spec) else zoo.zoo_tokenizer()
    return load_tokenizer(ref.location, trust_remote_code=trust_remote_code)


def load_causal_lm(spec: str | os.PathLike, *, device=None, dtype=None, trust_remote_code: bool = False,
                   with_tokenizer: bool = True):
    """``(model, tokenizer)`` from a local checkpoint folder or a hub id, safetensors only.

    ``dtype`` defaults to the checkpoint's own; ``device`` to CPU. The tokenizer is ``None``
    when ``with_tokenizer`` is false. A local folder is validated first (:func:`weight_files`,
    :func:`check_coverage`); for any base, tensors transformers reports missing after loading
    are an error, never a silently random layer.
    """
    from transformers import AutoModelForCausalLM

    spec = str(spec)
    where = spec
    if _looks_local(spec):
        folder = Path(spec).expanduser()
        raw = read_config_dict(folder)
        _refuse_remote_code(spec, raw, trust_remote_code)
        files = weight_files(folder)
        check_coverage(spec, model_config(BaseRef(spec, "local", str(folder)), trust_remote_code=trust_remote_code),
                       tensor_names(files))
        spec = str(folder)
    try:
        with _quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                spec, dtype=dtype if dtype is not None else "auto", trust_remote_code=trust_remote_code,
                use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot load a causal LM from {where!r}: {first_line(exc)}") from None
    missing = sorted(info.get("missing_keys") or [], key=_natural)
    if missing:
        raise UserError(f"{where}: the weights lack {len(missing)} tensors the model needs (e.g. "
                        f"{', '.join(missing[:3])}); they would start random. Restore the checkpoint")
    if device is not None:
        model = model.to(device)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code) if with_tokenizer else None
    return model, tokenizer


def load(spec: str, *, device=None, dtype=None, trust_remote_code: bool = False, progress: bool = True,
         with_tokenizer: bool = True):
    """``(model, tokenizer)`` of a base: a zoo name (built first when needed), a local folder or a hub id."""
    ref = resolve(spec)
    if ref.kind == "zoo":
        folder = zoo.build(spec, progress=progress)
        return load_causal_lm(folder, device=device, dtype=dtype, with_tokenizer=with_tokenizer)
    return load_causal_lm(ref.location, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                          with_tokenizer=with_tokenizer)
