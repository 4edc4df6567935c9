"""Checks around a study: its inputs before it starts, and its records after it ran.

- :func:`validate_study` runs everything that can reject a study before anything is written:
  each base's architecture and tokenizer, the m ranges, the token budget against one step,
  and the data, built (or found in the cache) with the first trial's tokenizer. A bad config
  then fails in seconds with one line, instead of at its first trial with a half-made study.
- :func:`check_study` compares a study's three records, the Optuna storage, ``results.csv``
  and the ``trials/`` folders, and lists every disagreement (tests run it after each crash).

    python -m ablate.check runs/default              # prints the problems; exit 1 if any
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from ablate.errors import UserError, cli

__all__ = ["validate_study", "check_study", "main"]

STARTED = ("COMPLETE", "PRUNED", "RUNNING")
CSV_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "fail", "RUNNING": "running", "WAITING": "waiting"}


def _model_config(spec: str, trust_remote_code: bool):
    """The transformers config of a local checkpoint or hub base, with one-line errors."""
    from transformers import AutoConfig

    from ablate.checkpoint import read_config_dict

    local = Path(spec).expanduser()
    if local.exists() or spec.startswith((".", "/", "~")):
        raw = read_config_dict(local)  # missing folder, no config.json, bad JSON: one line each
        _check_weights(local)
        try:
            return AutoConfig.from_pretrained(local, trust_remote_code=trust_remote_code)
        except (ValueError, KeyError):
            import transformers

            raise UserError(f"base {spec}: transformers {transformers.__version__} does not know the architecture "
                            f"{raw.get('model_type')!r}; use a decoder-only causal LM such as llama, mistral or "
                            "qwen2") from None
    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as exc:  # offline, gated, unknown: all one answer for the user
        raise UserError(f"cannot read the config of base model {spec!r}: {_first_line(exc)}") from None


def _check_weights(folder: Path) -> None:
    """Weights load from safetensors only: pickled ``.bin`` files can run code when loaded."""
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise UserError(f"{folder} holds only pickled weights (.bin), which can run code when loaded; convert "
                        "them to safetensors (model.save_pretrained(folder, safe_serialization=True))")
    raise UserError(f"{folder} has a config.json but no *.safetensors weights")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def _check_architecture(base, config, model_config, trust_remote_code: bool) -> None:
    """The base must build as a causal LM with ``model.model.layers`` (what DUS cuts and stacks)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ablate.moe import SUPPORTED

    kind = model_config.model_type
    fix = "use a decoder-only causal LM whose layers are model.model.layers, such as llama, mistral or qwen2"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):  # the module tree only: no memory, no weights read
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"base {base.model}: a {kind!r} model is not a causal LM ablate can build "
                        f"({_first_line(exc)}); {fix}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers, "__len__"):
        raise UserError(f"base {base.model}: unsupported architecture {kind!r} ({type(model).__name__} has no "
                        f"model.model.layers); {fix}")
    if config.methods.moe is not None and base.moe and kind not in SUPPORTED:
        raise UserError(f"bases[{base.name}]: the MoE upcycle supports {', '.join(SUPPORTED)} models, not {kind!r}; "
                        "set moe: false for this base")


def _tokenizer(spec: str, trust_remote_code: bool):
    """The tokenizer a trial will use for ``spec``, without loading (or building) the model."""
    from ablate import zoo
    from ablate.checkpoint import load_tokenizer

    if spec in zoo.ZOO:
        return load_tokenizer(str(zoo.zoo_dir(spec))) if zoo.is_built(spec) else zoo.zoo_tokenizer()
    return load_tokenizer(str(Path(spec).expanduser()) if Path(spec).expanduser().exists() else spec,
                          trust_remote_code=trust_remote_code)


def _vocab_size(model_config) -> int | None:
    size = getattr(model_config, "vocab_size", None)
    if size is None and hasattr(model_config, "get_text_config"):
        size = getattr(model_config.get_text_config(), "vocab_size", None)
    return size


def _check_m(config, depths: dict[str, int]) -> None:
    for b in config.bases:
        n = depths[b.name]
        bad = [m for m in (b.m or []) if not 0 <= m < n]
        if bad:
            raise UserError(f"bases[{b.name}].m: {bad} out of range for n={n}; choose 0 <= m < {n}")


def validate_study(config, *, trust_remote_code: bool = False, progress: bool = True) -> dict[str, int]:
    """Check a study's inputs the way its trials would meet them; return each base's depth n.

    Nothing is written but the data cache (``ablate_home()/data``), which the first trial
    would build anyway. Cheap checks run before expensive ones.
    """
    from ablate import zoo
    from ablate.data import load_packed, tokenizer_fingerprint
    from ablate.train import plan_budget
    from ablate.trial import base_depth

    if config.trust_remote_code and not trust_remote_code:
        raise UserError("the study sets trust_remote_code: true, which runs code shipped with the model; "
                        "pass --trust-remote-code on the command line to allow it")
    model_configs = {}
    depths = {}
    for b in config.bases:
        if b.model not in zoo.ZOO:
            zoo.check_spec(b.model)  # an unknown name: one line listing the zoo
            model_configs[b.name] = _model_config(b.model, trust_remote_code)
            _check_architecture(b, config, model_configs[b.name], trust_remote_code)
        depths[b.name] = base_depth(b.model, trust_remote_code=trust_remote_code)
    _check_m(config, depths)
    d, train = config.data, config.train
    plan_budget(train, seq_len=d.seq_len, num_train_rows=train.tokens // d.seq_len)  # one step fits, multiples
    val_rows = d.val_tokens // d.seq_len
    if train.eval_rows > val_rows:
        raise UserError(f"train.eval_rows={train.eval_rows} but data.val_tokens={d.val_tokens} makes {val_rows} "
                        f"rows of seq_len={d.seq_len}; lower train.eval_rows or raise data.val_tokens")
    built = set()
    for b in config.bases:
        tokenizer = _tokenizer(b.model, trust_remote_code)
        vocab = _vocab_size(model_configs[b.name]) if b.name in model_configs else None
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


def _close(a, b) -> bool:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return (a is None or a != a) and (b is None or b != b)
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _arm(attrs: dict) -> tuple:
    return attrs.get("base"), attrs.get("method"), attrs.get("m"), attrs.get("repeat")


def _check_folder(folder: Path, t) -> list[str]:
    """A finished trial's folder against its storage record."""
    name = f"trials/{t.number}"
    missing = [f for f in ("config.yaml", "env.json", "result.json") if not (folder / f).is_file()]
    if missing:
        return [f"{name} lacks {', '.join(missing)}"]
    try:
        result = json.loads((folder / "result.json").read_text())
    except json.JSONDecodeError:
        return [f"{name}/result.json is not valid JSON"]
    out = []
    if result.get("trial") != t.number:
        out.append(f"{name}/result.json names trial {result.get('trial')}")
    if _arm(result) != _arm(t.user_attrs):
        out.append(f"{name}/result.json has configuration {_arm(result)} but the storage {_arm(t.user_attrs)}")
    expected = {"COMPLETE": "completed", "PRUNED": "stopped", "FAIL": "failed"}[t.state.name]
    if result.get("status") != expected:
        out.append(f"{name}/result.json has status {result.get('status')!r} but the trial is {t.state.name}")
    if t.state.name == "COMPLETE" and not _close(result.get("objective"), t.value):
        out.append(f"{name}/result.json has objective {result.get('objective')} but the storage {t.value}")
    return out


def _check_folders(study_dir: Path, trials: list) -> list[str]:
    folder = study_dir / "trials"
    entries = list(folder.iterdir()) if folder.is_dir() else []
    done = {int(p.name): p for p in entries if p.is_dir() and p.name.isdigit()}
    by_number = {t.number: t for t in trials}
    out = []
    for t in trials:
        state, path = t.state.name, done.get(t.number)
        if state in ("COMPLETE", "PRUNED"):
            out += _check_folder(path, t) if path else [f"trial {t.number} is {state} but has no folder trials/"
                                                        f"{t.number}"]
        elif state == "FAIL" and path is not None:
            if "fail_reason" not in t.user_attrs or "duplicate_of" in t.user_attrs:
                out.append(f"trials/{t.number} looks complete but trial {t.number} failed without running to a "
                           "result (killed, interrupted or a duplicate)")
            else:
                out += _check_folder(path, t)
        elif state in ("RUNNING", "WAITING") and path is not None:
            out.append(f"trials/{t.number} looks complete but the storage has the trial {state}")
    out += [f"trials/{n} has no trial in the storage" for n in sorted(done) if n not in by_number]
    for p in entries:
        match = re.match(r"^\.(\d+)\.(partial|old)-", p.name)
        owner = by_number.get(int(match.group(1))) if match else None
        if match and (owner is None or owner.state.name != "RUNNING"):
            out.append(f"trials/{p.name} is a leftover of an unfinished write")
    return out


def _check_configurations(trials: list) -> list[str]:
    """No configuration ran twice: duplicates that stood down and trials that died do not count."""
    seen: dict[tuple, list[int]] = {}
    for t in trials:
        started = t.state.name in STARTED or (t.state.name == "FAIL" and "fail_reason" in t.user_attrs)
        if started and "duplicate_of" not in t.user_attrs and t.user_attrs.get("base") is not None:
            seen.setdefault(_arm(t.user_attrs), []).append(t.number)
    return [f"configuration {arm} ran in trials {numbers}" for arm, numbers in seen.items() if len(numbers) > 1]


def _check_csv(study_dir: Path, trials: list) -> list[str]:
    import pandas as pd

    path = study_dir / "results.csv"
    if not path.is_file():
        return ["results.csv is missing"] if trials else []
    frame = pd.read_csv(path)
    rows = {int(r["trial"]): r for r in frame.to_dict("records")}
    numbers = {t.number for t in trials}
    out = [f"results.csv has trial {n}, the storage does not" for n in sorted(set(rows) - numbers)]
    out += [f"results.csv lacks trial {n}" for n in sorted(numbers - set(rows))]
    for t in trials:
        row = rows.get(t.number)
        if row is None:
            continue
        if row["state"] != CSV_STATES[t.state.name]:
            out.append(f"results.csv has trial {t.number} {row['state']} but the storage {CSV_STATES[t.state.name]}")
        value = t.value if t.values is not None and len(t.values) == 1 else None  # pruned: its last loss
        if not _close(None if pd.isna(row["objective"]) else row["objective"], value):
            out.append(f"results.csv has trial {t.number} objective {row['objective']} but the storage {value}")
        for key in ("base", "method", "m"):
            mine, theirs = row.get(key), t.user_attrs.get(key)
            mine = None if pd.isna(mine) else mine
            numbers = isinstance(mine, (int, float)) and isinstance(theirs, (int, float))
            if mine != theirs and not (numbers and _close(mine, theirs)):
                out.append(f"results.csv has trial {t.number} {key}={mine} but the storage {theirs}")
    return out


def check_study(study_dir: str | Path, storage: str | None = None) -> list[str]:
    """Every disagreement between a study's storage, ``results.csv`` and ``trials/`` folders.

    - a finished trial has a complete folder whose ``result.json`` matches its state, value and
      configuration, and a failed trial's folder (when it has one) records the failure;
    - no folder looks complete for a trial the storage has not finished (killed, running,
      queued or unknown), and no ``.N.partial-*`` leftover remains beside a finished trial;
    - no configuration ran twice; ``results.csv`` has the storage's trials, states and values.

    ``storage`` overrides the URL in ``study.json`` (needed when it held a password).
    """
    import optuna

    from ablate.results import study_dir_info
    from ablate.storage import open_storage

    study_dir = Path(study_dir)
    info = study_dir_info(study_dir)
    url = storage or info.get("storage")
    if not url or "***" in url:
        raise UserError(f"{study_dir}: its storage URL held a password, which is never recorded; pass it again")
    try:
        study = optuna.load_study(study_name=info["name"], storage=open_storage(url))
    except KeyError:
        return [f"the storage {info.get('storage')} has no study {info['name']!r}"]
    trials = study.get_trials(deepcopy=False)
    return _check_folders(study_dir, trials) + _check_configurations(trials) + _check_csv(study_dir, trials)


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ablate.check",
                                     description="List disagreements between a study's storage, results.csv and "
                                                 "trial folders (exit 1 if there are any).")
    parser.add_argument("study", help="a study folder, e.g. runs/default")
    parser.add_argument("--storage", default=None, help="storage URL, when study.json's is redacted")
    args = parser.parse_args(argv)
    problems = check_study(args.study, args.storage)
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) in {args.study}" if problems else f"{args.study}: consistent")
    return 1 if problems else 0


if __name__ == "__main__":
    main()
