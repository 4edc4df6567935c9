"""The study preflight: everything that can reject a study, checked before anything is written.

A bad config, base, device, storage or data source then fails in seconds with one line,
instead of at its first trial with a half-made study folder, and a problem that would hit
every trial (a device that is not there, a base whose files are broken) is never charged to
the study's configurations. The checks run cheap first: the device, the output folder, the
storage, then each base (through :mod:`ablate.base`), the m ranges, the token budget against
one step, and last the data, built (or found in the cache) with each tokenizer a trial will use.

Nothing is written but the data cache (``ablate_home()/data``), which the first trial would
build anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ablate import base as bases
from ablate.config import StudyConfig, config_changes
from ablate.data import load_packed, tokenizer_fingerprint
from ablate.errors import UserError
from ablate.fsutil import check_writable
from ablate.objective import direction
from ablate.params import count_params, training_flops_per_token
from ablate.plan import PlanError, parse_plan
from ablate.search import SearchSpace
from ablate.storage import canonical_url, check_storage_url, default_storage_url, open_storage, redact, storage_kind
from ablate.train import plan_budget, plan_points

MAX_CONFIGURATIONS = 100_000  # (base, method, m, repeat, lr) cells a study may hold (nocpt rows included)

__all__ = ["Plan", "preflight", "validate_study", "resolve_device", "storage_for"]


@dataclass(frozen=True)
class Plan:
    """What a validated study needs to run: each base's depth, its folder, storage and device."""

    depths: dict[str, int]
    study_dir: Path
    url: str
    shown_url: str  # the URL as recorded: the password, if any, redacted
    direction: str
    device: str


def resolve_device(choice: str) -> str:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``, checked to exist here."""
    import torch  # lazy: this module is imported by commands that never train

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {choice!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return "cpu" if device.index is None else choice
    if device.type != "cuda":
        raise UserError(f"--device {choice}: ablate runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {choice}: CUDA is not available here; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {choice}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                        f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return choice


def storage_for(study_dir: Path, storage: str | None, recorded: str | None) -> str:
    """The storage URL of this run: the one given, else the one the study was started with."""
    storage = canonical_url(storage) if storage is not None else None
    default = default_storage_url(study_dir)
    # the default SQLite file of a study folder that was moved or copied since: use the one here
    moved = recorded is not None and recorded.startswith("sqlite:///") and \
        recorded.endswith(f"/{study_dir.name}/study.db")
    if storage is None:
        if recorded and "***" in recorded:
            raise UserError(f"study {study_dir.name!r} uses a storage with a password, which is never recorded; "
                            "pass it again with --storage")
        return default if recorded is None or moved else recorded
    if recorded is not None and redact(storage) != recorded and not (moved and storage == default):
        raise UserError(f"study {study_dir.name!r} in {study_dir.parent} was started with --storage {recorded}; "
                        "continue it with that storage, or start a new study with --study NAME")
    return storage


def _recorded(config: StudyConfig, study_dir: Path, out: Path) -> str | None:
    """The storage URL an existing study folder was started with (None for a new study)."""
    info_path = study_dir / "study.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{info_path} is not valid JSON; restore it, or start a new study with --study NAME") \
            from None
    mine = config.model_dump(mode="json")
    if not isinstance(info, dict) or info.get("config") != mine:
        changed = config_changes(info.get("config") if isinstance(info, dict) else None, mine)
        advice = ("; a key new in this ablate means the study was started by an earlier version: continue it "
                  "with that version, or start a new study with --study NAME") if "(new in this ablate)" in changed \
            else "; rerun it with the same config, or start a new study with --study NAME"
        raise UserError(f"study {config.name!r} in {out} was run with another config (differs in {changed})"
                        + advice)
    return info.get("storage")


def preflight(config: StudyConfig, out: Path, *, storage: str | None = None, device: str = "auto",
              trust_remote_code: bool = False, progress: bool = True) -> Plan:
    """Validate everything a study needs before anything is written; return its :class:`Plan`."""
    device = resolve_device(device)
    study_dir = Path(out) / config.name
    check_writable(study_dir)
    url = storage_for(study_dir, storage, _recorded(config, study_dir, Path(out)))
    if url != default_storage_url(study_dir):  # the default's folder is the study folder, made later
        check_storage_url(url)
    if storage_kind(url) in ("postgresql", "mysql"):
        open_storage(url)  # an unreachable server fails now, before minutes of data building
    depths = validate_study(config, trust_remote_code=trust_remote_code, progress=progress)
    count = SearchSpace(config, depths).count()  # counted, not listed
    if count > MAX_CONFIGURATIONS:  # the search space is enumerated: bound it before it fills memory
        raise UserError(f"the study has {count:,} configurations, over {MAX_CONFIGURATIONS:,}; lower repeats, "
                        "narrow the m lists or shorten the lr grid")
    return Plan(depths, study_dir, url, redact(url), direction(config.eval.objective), device)


def validate_study(config: StudyConfig, *, trust_remote_code: bool = False, progress: bool = True) -> dict[str, int]:
    """Check a study's bases, m ranges, budget and data the way its trials would meet them; return each base's n.

    ``trust_remote_code`` is the command line's permission. Code shipped with a model runs only
    when the study config says so too: the config records it, the flag allows it, and neither
    alone is enough.
    """
    if config.trust_remote_code and not trust_remote_code:
        raise UserError("the study sets trust_remote_code: true, which runs code shipped with the model; "
                        "pass --trust-remote-code on the command line to allow it")
    trust = config.trust_remote_code and trust_remote_code
    infos = {b.name: bases.inspect(b.model, trust_remote_code=trust, moe=config.methods.moe is not None and b.moe)
             for b in config.bases}
    depths = {name: info.depth for name, info in infos.items()}
    _check_m(config, depths)
    d, train = config.data, config.train
    if train.budget_unit == "flops":  # checked in the base's tokens; each arm converts its own in its trial
        train = train.in_tokens(min(_flops_per_token(info.config, d.seq_len) for info in infos.values()))
    plan_budget(train, seq_len=d.seq_len, num_train_rows=train.tokens // d.seq_len)  # one step fits, multiples
    plan_points(train)  # every budget point at least a step, one step from the next, after the warmup
    val_rows = d.val_tokens // d.seq_len
    if train.eval_rows > val_rows:
        raise UserError(f"train.eval_rows={train.eval_rows} but data.val_tokens={d.val_tokens} makes {val_rows} "
                        f"rows of seq_len={d.seq_len}; lower train.eval_rows or raise data.val_tokens")
    built = set()
    for b in config.bases:
        tokenizer = bases.tokenizer_for(b.model, trust_remote_code=trust)
        vocab = _vocab_size(infos[b.name].config) if infos[b.name].ref.kind != "zoo" else None
        if vocab is not None and len(tokenizer) > vocab:
            raise UserError(f"base {b.model}: its tokenizer has {len(tokenizer)} tokens but the model's vocab_size "
                            f"is {vocab}; use the tokenizer saved with this model")
        key = tokenizer_fingerprint(tokenizer)
        if key not in built:  # the data a trial would read, cached for it
            data = load_packed(d.source, tokenizer, seq_len=d.seq_len, train_tokens=train.tokens,
                               val_tokens=d.val_tokens, seed=d.seed, progress=progress)
            plan_budget(train, seq_len=d.seq_len, num_train_rows=int(data.train.shape[0]))
            built.add(key)
    return depths


def _flops_per_token(model_config, seq_len: int) -> int:
    """Training FLOPs per token of a model of ``model_config``, counted on the meta device."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return training_flops_per_token(model_config, count_params(model)["active"], seq_len)


def _vocab_size(model_config) -> int | None:
    size = getattr(model_config, "vocab_size", None)
    if size is None and hasattr(model_config, "get_text_config"):
        size = getattr(model_config.get_text_config(), "vocab_size", None)
    return size


def _check_m(config: StudyConfig, depths: dict[str, int]) -> None:
    for b in config.bases:
        n = depths[b.name]
        bad = [m for m in (b.m or []) if not 0 <= m < n]
        if bad:
            raise UserError(f"bases[{b.name}].m: {bad} out of range for n={n}; choose 0 <= m < {n}")
        for text in config.methods.operators:  # an operator is an arm of every base: it must fit each
            try:
                parse_plan(text).check(n)
            except PlanError as exc:
                raise UserError(f"methods.operators: base {b.name!r}: {exc}") from None
