"""Loading Hugging Face causal-LM checkpoints safely: local folders or hub ids.

Weights load from safetensors only (pickled ``.bin`` weights can run code on load and
are refused unless the caller opts in), and ``trust_remote_code`` stays off unless the
user asks for it. Every problem a user can fix becomes a one-line :class:`UserError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ablate.errors import UserError

__all__ = ["is_local_checkpoint", "read_config_dict", "load_causal_lm", "load_tokenizer"]


def is_local_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding a ``config.json``."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def read_config_dict(path: str | os.PathLike) -> dict:
    """The raw ``config.json`` of a local checkpoint folder, with one-line errors."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist; give a local checkpoint folder or a hub id")
    if not p.is_dir():
        raise UserError(f"{p} is not a folder; a checkpoint is a folder with config.json")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UserError(f"{p} is not a Hugging Face checkpoint: it has no config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{cfg} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained`` with one-line errors."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {spec!r}: {_first_line(exc)}") from None


def load_causal_lm(
    spec: str | os.PathLike,
    *,
    device: str | None = None,
    dtype=None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    with_tokenizer: bool = True,
):
    """Load ``(model, tokenizer)`` from a local checkpoint folder or a hub id.

    ``dtype`` defaults to the checkpoint's own; ``device`` to CPU. The tokenizer is
    ``None`` when ``with_tokenizer`` is false.
    """
    from transformers import AutoModelForCausalLM

    spec = str(spec)
    local = Path(spec).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")):
        read_config_dict(local)  # existence, folder, config.json: one-line errors
        has_safetensors = any(local.glob("*.safetensors"))
        if not has_safetensors and not allow_pickle:
            if any(local.glob("*.bin")) or any(local.glob("*.pt")):
                raise UserError(
                    f"{local} holds only pickled weights (.bin), which can run code when loaded; "
                    "convert it to safetensors or pass --allow-pickle if you trust it"
                )
            raise UserError(f"{local} has a config.json but no *.safetensors weights")
        spec = str(local)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            spec,
            dtype=dtype if dtype is not None else "auto",
            trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load a causal LM from {spec!r}: {_first_line(exc)}") from None
    if device is not None:
        model = model.to(device)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust_remote_code) if with_tokenizer else None
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
