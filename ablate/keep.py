"""Kept variants: the trained models a study leaves behind, as ordinary Hugging Face checkpoints.

``--keep best`` (the default) keeps, per base and operator (and per budget point when
``train.budgets`` has several), the trained variant of the best trial so far, by the study's
objective and direction, in ``<study>/kept/best/<base>/<method>[@<budget>]/``; a better trial
replaces it. ``--keep all`` keeps every trial's in ``<study>/kept/trials/<number>[@<budget>]/``.
``--keep none`` keeps nothing. DUS's best over m is one folder: the operator is DUS, m is a choice.

A kept folder is what ``save_pretrained`` writes (``config.json``, ``model.safetensors``,
``generation_config.json``, the tokenizer), loadable with ``AutoModelForCausalLM.from_pretrained``,
plus ``README.md`` (the model card, :mod:`ablate.card`), the mergekit recipe that rebuilds the
untrained variant, and ``keep.json``: what was kept (trial, arm, budget point, scores), which is
what the next trial compares itself with.

Safety: each folder's compare-and-replace runs under a file lock of its own, so workers decide one
at a time; the replacement is written beside the folder and renamed over it
(:func:`ablate.fsutil.atomic_dir`), so a kill leaves the old folder or the new one, never a mix. A
kept folder whose trial later failed (killed, diverged) is removed when the cards are refreshed
(:meth:`Keeper.refresh`, after every trial): its configuration runs again. A folder someone deleted
is filled again by the next trial of its slot, and the summary names a best trial whose model is
no longer kept. Before a trial trains, :meth:`TrialKeeper.check_room` fails the study with the size
a kept checkpoint needs when its disk cannot hold it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from types import SimpleNamespace

from ablate.card import comparison, hub_datasets, model_card, rebuild_recipe
from ablate.errors import UserError
from ablate.fsutil import atomic_dir, atomic_write_text, clean_partials, waiting_lock

__all__ = ["KEPT", "INFO", "NoRoom", "Keeper", "TrialKeeper", "save_variant", "checkpoint_bytes", "check_room",
           "read_info", "kept_folders", "folder_bytes", "better", "free_bytes"]

KEPT = "kept"  # under the study folder
INFO = "keep.json"  # in each kept folder: what it holds
MARGIN = 1 << 20  # config, card, recipe and generation config beside the weights: well under 1 MB


class NoRoom(UserError):
    """The disk cannot hold a kept checkpoint: the study stops before the trial trains."""


def _slug(text: str) -> str:
    """A folder-safe spelling of a base label or method (``llama_pro(2)`` -> ``llama_pro_2``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "_"


def checkpoint_bytes(model, tokenizer=None) -> int:
    """Bytes a checkpoint of ``model`` (and ``tokenizer``) takes: every distinct tensor once, plus a margin."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel()) if tensor.device.type != "meta" else id(tensor)
        if key in seen:  # tied weights are saved once
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        total += 2 * len(backend.to_str())  # tokenizer.json, plus the vocab files some tokenizers add
    return total + MARGIN


def _existing(path: Path) -> Path:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or would hold it: its nearest existing parent)."""
    return shutil.disk_usage(_existing(path)).free


def check_room(folder: Path, need: int) -> None:
    """Raise :class:`NoRoom` (one line, with the size needed) unless ``folder``'s disk has ``need`` bytes free."""
    probe = _existing(folder)
    free = free_bytes(probe)
    if free < need:
        raise NoRoom(f"no room for a kept checkpoint in {folder}: it needs {need / 1e6:,.1f} MB and {probe} has "
                     f"{free / 1e6:,.1f} MB free; free space, choose another --out, or pass --keep none")


def save_variant(model, tokenizer, folder: str | Path, card_text: str, *, extra_files: dict[str, str] | None = None,
                 state_dict: dict | None = None) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face checkpoint in ``folder``, atomically, with its card.

    ``folder`` is replaced as a whole only once the new checkpoint is complete (safetensors, tokenizer,
    generation config, ``README.md`` = ``card_text``, and ``extra_files`` by name). ``state_dict`` is
    passed to ``save_pretrained``: a caller whose model is sharded (FSDP) gathers the full state dict on
    its main process and passes it here, with the unsharded module as ``model``.
    """
    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one shard's "Writing model shards" bar in the middle of a study's output
    try:
        with atomic_dir(folder, overwrite=True) as tmp:
            _write(model, tokenizer, tmp, card_text, extra_files, state_dict)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return folder


def _write(model, tokenizer, tmp: Path, card_text: str, extra_files: dict | None, state_dict: dict | None) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if type(model).__name__.startswith("FSDP"):  # save_pretrained named the sharded class: name the loadable one
        from ablate.distributed import plain_architecture

        model.config.architectures = [plain_architecture(model)]
        model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not (tmp / "generation_config.json").is_file():  # a model that cannot generate still gets one
        GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
    (tmp / "README.md").write_text(card_text, encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")


def read_info(folder: Path) -> dict | None:
    """The ``keep.json`` of a kept folder, or None (no folder, or not a complete one)."""
    try:
        info = json.loads((Path(folder) / INFO).read_bytes())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def better(new: float, old: float, direction: str) -> bool:
    """``new`` beats ``old`` in the study's direction (a tie keeps the one kept first; NaN never wins)."""
    if new is None or not math.isfinite(new):
        return False
    if old is None or not math.isfinite(old):
        return True
    return new < old if direction == "minimize" else new > old


def kept_folders(study_dir: Path) -> list[Path]:
    """Every complete kept folder of a study (one with ``keep.json``), sorted."""
    root = Path(study_dir) / KEPT
    return sorted(p.parent for p in root.glob(f"**/{INFO}") if not any(part.startswith(".") for part in
                                                                        p.relative_to(root).parts))


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _remove(folder: Path) -> None:
    """Take a kept folder away in one rename, then delete it. A kill in between leaves a hidden leftover
    named as :func:`ablate.fsutil.atomic_dir` names a replaced folder, which the next writer there removes."""
    aside = folder.with_name(f".{folder.name}.old-{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        folder.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)


class Keeper:
    """A study's kept variants: where each goes, which is better, the cards and the report."""

    def __init__(self, study_dir: Path, config, direction: str):
        self.study_dir = Path(study_dir)
        self.root = self.study_dir / KEPT
        self.config = config
        self.mode = config.keep
        self.direction = direction
        self.multi = len(config.train.budget_points) > 1

    def folder(self, arm, trial: int, budget) -> Path:
        """Where ``arm``'s variant at budget point ``budget`` of trial ``trial`` is kept."""
        at = f"@{budget}" if self.multi else ""
        if self.mode == "all":
            return self.root / "trials" / f"{trial}{at}"
        return self.root / "best" / _slug(arm.base) / f"{_slug(arm.method)}{at}"

    def lock(self, folder: Path):
        name = "__".join(folder.relative_to(self.root).parts)
        return waiting_lock(self.root / ".locks" / f"{name}.lock")

    def for_trial(self, ws, arm, trial, env: dict) -> TrialKeeper | None:
        """The keeper of one running trial (None with ``--keep none`` and for the no-CPT reference)."""
        if self.mode == "none" or arm.method == "nocpt":
            return None
        return TrialKeeper(self, ws, arm, trial, env)

    def _frame(self, study):
        from ablate.results import BUDGET_COLUMNS, _frame, budget_rows

        return _frame(budget_rows(self.study_dir, study), BUDGET_COLUMNS)

    def refresh(self, study) -> None:
        """Rewrite every kept folder's card from the records as they are now (the intervals against the
        control grow with the study), and remove a kept folder whose trial has failed since it was kept."""
        if self.mode == "none" or not self.root.is_dir():
            return
        from ablate.stats import paired_gaps

        states = {t.number: t.state.name for t in study.get_trials(deepcopy=False)}
        frame = gaps = None
        for folder in kept_folders(self.study_dir):
            clean_partials(folder.parent)
            with self.lock(folder):
                info = read_info(folder)
                if info is None:
                    continue
                if states.get(info.get("trial")) == "FAIL":
                    _remove(folder)
                    print(f"kept {folder.relative_to(self.study_dir)}: trial {info['trial']} failed after it was kept; "
                          "removed (the next trial of its configuration fills it)")
                    continue
                if frame is None:  # once per refresh, for every card
                    frame = self._frame(study)
                    gaps = paired_gaps(frame, "objective", self.direction) if len(frame) else None
                text = model_card(info, comparison(frame, info, self.direction, gaps))
                readme = folder / "README.md"
                with contextlib.suppress(OSError):
                    if readme.read_text(encoding="utf-8") == text:
                        continue
                if (folder / INFO).is_file():
                    atomic_write_text(readme, text)

    def report(self, study) -> tuple[list[dict], list[str]]:
        """The kept folders (path, trial, arm, budget, objective, bytes on disk) and notes: a best trial
        whose kept folder was deleted, so the folder holds a worse one or nothing."""
        rows = []
        for folder in kept_folders(self.study_dir):
            info = read_info(folder)
            if info is None:
                continue
            rows.append({"folder": str(folder.relative_to(self.study_dir)), "trial": info["trial"],
                         "base": info["arm"]["base"], "method": info["arm"]["method"], "m": info["arm"].get("m"),
                         "budget": info["cpt"]["budget"], "objective": info["objective"],
                         "bytes": folder_bytes(folder)})
        notes = []
        if self.mode != "best":
            return rows, notes
        frame = self._frame(study)
        if not len(frame):
            return rows, notes
        done = frame[frame["state"].isin(["complete", "pruned"]) & (frame["method"] != "nocpt")
                     & frame["objective"].notna()]
        kept = {r["folder"]: r for r in rows}
        for (base, method, budget), g in done.groupby(["base", "method", "budget"]):
            best = g.loc[g["objective"].idxmin() if self.direction == "minimize" else g["objective"].idxmax()]
            budget = int(budget) if float(budget).is_integer() else budget  # as the folder names it
            where = str(self.folder(SimpleNamespace(base=base, method=method), int(best["trial"]), budget)
                        .relative_to(self.study_dir))
            have = kept.get(where)
            if have is None:
                notes.append(f"{where} is missing (deleted?): the best trial there, {int(best['trial'])}, is not kept")
            elif better(float(best["objective"]), have["objective"], self.direction):
                notes.append(f"{where} holds trial {have['trial']}; trial {int(best['trial'])} scored better but its "
                             "kept folder was deleted")
        return rows, notes

    def print_report(self, study) -> list[dict]:
        """Print the kept variants with their disk cost; return the rows."""
        from rich.console import Console
        from rich.table import Table

        if self.mode == "none":
            return []
        rows, notes = self.report(study)
        console = Console()
        if rows:
            table = Table(title=f"Kept variants (--keep {self.mode}) in {self.study_dir / KEPT}", title_justify="left")
            for col in ("folder", "trial", "arm", "budget", "objective", "disk"):
                table.add_column(col, justify="left" if col in ("folder", "arm") else "right",
                                 overflow="fold")  # a path is read whole, never cut to "…"
            for r in rows:
                arm = f"{r['method']}" + (f" m={r['m']}" if r["m"] is not None else "")
                table.add_row(r["folder"], str(r["trial"]), arm, f"{r['budget']:,}", f"{r['objective']:.4f}",
                              f"{r['bytes'] / 1e6:,.2f} MB")
            console.print(table)
            total = sum(r["bytes"] for r in rows)
            console.print(f"  {len(rows)} kept, {total / 1e6:,.2f} MB in all ({total / len(rows) / 1e6:,.2f} MB each)")
        for note in notes:
            console.print(f"  {note}")
        return rows


class TrialKeeper:
    """Keeps one trial's variant at its budget points: room checked before CPT, offered at each point."""

    def __init__(self, keeper: Keeper, ws, arm, trial, env: dict):
        self.keeper, self.ws, self.arm, self.trial, self.env = keeper, ws, arm, trial, env

    def check_room(self, model, tokenizer) -> None:
        """Before CPT: the disk holds this trial's kept checkpoints (one per budget point), or :class:`NoRoom`."""
        points = len(self.keeper.config.train.budget_points)
        check_room(self.keeper.root, checkpoint_bytes(model, tokenizer) * points)

    def _failed(self, number: int) -> bool:
        from optuna.trial import TrialState

        return any(t.number == number for t in self.trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))

    def offer(self, model, tokenizer, facts: dict, point: dict, state_dict: dict | None = None) -> Path | None:
        """Keep ``model`` as it is at ``point`` when its slot is empty, holds a worse variant, or holds one whose
        trial has failed since; return the folder written (None when the kept one stays). ``state_dict``: the
        full tensors of a sharded ``model`` (:func:`ablate.distributed.full_state_dict`)."""
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank():
            return None  # one process writes
        k = self.keeper
        folder = k.folder(self.arm, self.trial.number, point["budget"])
        with k.lock(folder):
            if not self._replaces(folder, point):
                return None
            info = self._info(facts, point, folder)
            text = model_card(info, comparison(k._frame(self.trial.study), info, k.direction))
            save_variant(model, tokenizer, folder, text, state_dict=state_dict, extra_files={
                info["recipe"]["file"]: info["recipe"]["text"], INFO: json.dumps(info, indent=2, default=str) + "\n"})
        return folder

    def wants(self, point: dict) -> bool:
        """Whether :meth:`offer` would write ``point``'s variant now (read without the lock: ``offer`` decides
        again under it). A sharded variant is gathered only when this is true."""
        return self._replaces(self.keeper.folder(self.arm, self.trial.number, point["budget"]), point)

    def _replaces(self, folder: Path, point: dict) -> bool:
        k = self.keeper
        current = read_info(folder)
        return not (k.mode == "best" and current is not None and current.get("trial") != self.trial.number
                    and not better(point["objective"], current.get("objective"), k.direction)
                    and not self._failed(current.get("trial")))

    def _info(self, facts: dict, point: dict, folder: Path) -> dict:
        from ablate import base as bases
        from ablate.plan import solar
        from ablate.stats import arm_label

        cfg, arm, k = self.ws.config, self.arm, self.keeper
        spec = next(b for b in cfg.bases if b.name == arm.base).model
        ref = bases.resolve(spec)
        src = ref.location
        base_model, _ = self.ws.base(arm.base)
        n = facts["n"]
        plan = solar(arm.m).plan(n) if arm.method == "dus" else None if arm.method == "moe" else self.ws.plan(arm)
        moe = cfg.methods.moe
        file, text = rebuild_recipe(arm, src, n, base_model.config, plan, moe)
        unit = cfg.train.budget_unit
        label = arm_label(arm.method, arm.m)
        objective = cfg.eval.objective.describe()
        why = (f"The best {label.split(' m=')[0]} variant of base `{arm.base}` at this budget point among the study's "
               f"trials so far, by {objective}." if k.mode == "best" else f"Trial {self.trial.number}'s variant.")
        return {
            "study": cfg.name, "trial": self.trial.number, "keep": k.mode,
            "folder": str(folder.relative_to(k.study_dir)), "arm": arm.to_dict(),
            "title": f"{cfg.name}: {arm.base} {label} at {point['budget']:,} {unit}", "why": why,
            "base_model": spec, "base_kind": ref.kind, "base_location": src, **facts,
            "experts": moe.experts if arm.method == "moe" else None,
            "top_k": moe.top_k if arm.method == "moe" else None,
            "plan": list(plan.sources) if plan is not None else None, "recipe": {"file": file, "text": text},
            "cpt": {"budget": point["budget"], "budget_unit": unit, "tokens": point["tokens"], "flops": point["flops"],
                    "steps": point["steps"], "lr": facts.get("peak_lr"), "schedule": facts.get("schedule"),
                    "seed": facts.get("seed"), "data_order_seed": facts.get("data_order_seed"),
                    "trainable": facts.get("trainable")},
            "data": cfg.data.source.describe(), "datasets": hub_datasets(cfg.data.source),
            "metrics": point["metrics"], "objective": point["objective"], "objective_name": objective,
            "direction": k.direction, "env": self.env, "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
