"""One trial of a study: build the variant, continue pretraining it, evaluate it, record it.

:class:`Workspace` holds what every trial of a worker shares (base models, packed data,
the evaluation tasks), loaded once. :func:`run_trial` turns an :class:`~ablate.search.Arm`
into a record of numbers. :class:`Objective` is the Optuna side: it claims the configuration,
runs the trial and writes its folder ``<study>/trials/<number>/`` atomically: the resolved
config, ``env.json``, CPT's ``metrics.jsonl`` and ``result.json``.

``result.json`` is the trial's one record (:mod:`ablate.results` reads the study's table from
these files). Optuna keeps what its samplers, pruners and the study's bookkeeping need: the
parameters, the value, the state, the intermediate losses, the configuration (base, method, m,
repeat) and why a trial failed, stood down or was interrupted.

With a :class:`~ablate.storage.Worker` (the study command always passes one) the trial is
marked with the process that runs it, and once its configuration is in the storage the
study's sampling lock is released. A trial whose configuration another trial already holds
(possible only where workers cannot lock each other out) stands down before doing any work:
it fails with ``duplicate_of`` set, which gives the configuration back to the study, so no
configuration ever runs twice, at worst it is drawn again later.
"""

from __future__ import annotations

import contextlib
import gc
import json
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
import yaml

from ablate import base as bases
from ablate import distributed
from ablate.config import StudyConfig
from ablate.data import load_packed, tokenizer_fingerprint
from ablate.errors import disk_full, one_line
from ablate.evaluate import evaluate, perplexity
from ablate.fsutil import atomic_dir, atomic_write_json, atomic_write_text
from ablate.keep import Keeper, NoRoom, TrialKeeper
from ablate.moe import upcycle
from ablate.objective import objective_value
from ablate.params import count_params, training_flops_per_token
from ablate.plan import parse_plan, solar
from ablate.redundancy import measure
from ablate.search import NOCPT, SearchSpace, train_config_for
from ablate.storage import Worker
from ablate.synthetic import answer_metrics, task_names
from ablate.train import continue_pretraining
from ablate.upscale import apply_plan, depth_upscale
from ablate.zoobuild import build_many

__all__ = ["TrialFailed", "Workspace", "Objective", "run_trial", "repeat_train_config", "environment"]

MEASURE_ROWS = 32  # held-out rows an operator that chooses layers by redundancy measures its base on (as the figure)


class TrialFailed(Exception):
    """A trial that cannot give a result (non-finite loss, a broken variant); the study goes on."""


class Workspace:
    """What the trials of one worker share, loaded on first use."""

    def __init__(self, config: StudyConfig, device: str, tasks_dir: Path | None, progress: bool = True):
        self.config = config
        self.device = device
        self.tasks_dir = tasks_dir
        self.progress = progress
        self._bases: dict[str, tuple] = {}
        self._data: dict[str, object] = {}
        self._plans: dict[tuple[str, str], object] = {}

    def build_zoo(self) -> None:
        """Build the study's missing zoo bases now, side by side (one process each on a CPU),
        rather than one after another as their first trials need them."""
        names = [b.model for b in self.config.bases if bases.resolve(b.model).kind == "zoo"]
        if names:
            build_many(names, progress=self.progress)

    def base(self, label: str):
        """``(model, tokenizer)`` of a base, on the study's device, in eval mode."""
        if label not in self._bases:
            spec = next(b for b in self.config.bases if b.name == label).model
            model, tokenizer = bases.load(spec, trust_remote_code=self.config.trust_remote_code,
                                          progress=self.progress)
            self._bases[label] = (model.to(self.device).eval(), tokenizer)
        return self._bases[label]

    def data(self, tokenizer, tokens: int | None = None):
        """Packed CPT and held-out rows for this tokenizer, at least ``tokens`` of CPT rows (default: the
        study's budget; an arm of an equal-FLOPs study may need more). Cached on disk by ablate.data;
        packing is prefix-stable, so a larger packing begins with the rows of a smaller one."""
        key = tokenizer_fingerprint(tokenizer)
        train = self.config.train
        if tokens is None:  # equal FLOPs: each arm asks for its own tokens; nocpt needs held-out rows only
            tokens = train.tokens if train.budget_unit == "tokens" else train.tokens_per_step
        have = self._data.get(key)
        if have is None or have.train_tokens < tokens:
            d = self.config.data
            self._data[key] = load_packed(d.source, tokenizer, seq_len=d.seq_len, train_tokens=tokens,
                                          val_tokens=d.val_tokens, seed=d.seed, progress=self.progress)
        return self._data[key]

    def plan(self, arm):
        """The layer plan (:class:`ablate.plan.Plan`) of an operator arm on its base, cached per (base, operator).

        An operator that chooses layers by redundancy (``similar``, ``prune`` by angular or influence)
        measures the base as it is, before any CPT, on the first ``MEASURE_ROWS`` held-out rows: the
        same layers for every repeat and lr of the arm.
        """
        key = (arm.base, arm.method)
        if key not in self._plans:
            model, tokenizer = self.base(arm.base)
            op, n = parse_plan(arm.method), model.config.num_hidden_layers
            needs = op.needs(n)
            measured = measure(model, self.data(tokenizer).val[:MEASURE_ROWS], needs,
                               batch_size=self.config.train.micro_batch_size) if needs else None
            self._plans[key] = op.plan(n, measured)
        return self._plans[key]

    def use_plan(self, arm, plan) -> None:
        """Take ``plan`` as ``arm``'s layer plan (a rank > 0 of a worker takes rank 0's)."""
        self._plans[(arm.base, arm.method)] = plan

    def task_groups(self) -> dict[int | None, list[str]]:
        """Task names by few-shot count: the study's lm-eval tasks plus the synthetic ones."""
        groups = self.config.eval.task_groups()
        if self.config.eval.synthetic_tasks:
            groups.setdefault(self.config.eval.num_fewshot, []).extend(task_names(self.tasks_dir))
        return groups


def build_variant(ws: Workspace, arm, base):
    """The variant of ``arm`` from ``base``, a new model on the base's device."""
    if arm.method == "dus":
        return depth_upscale(base, arm.m)
    if arm.method != "moe":  # a layer-plan operator, spelt as its method
        return apply_plan(base, ws.plan(arm))
    moe = ws.config.methods.moe
    return upcycle(base, moe.experts, moe.top_k, router_std=moe.router_std, expert_noise=moe.expert_noise,
                   seed=ws.config.train.seed + arm.repeat)


def new_layers_of(ws: Workspace, arm, n: int) -> list[int]:
    """The layers ``arm``'s variant added to its base (what ``train.trainable: new`` trains): DUS's second
    copies, an operator's inserted or repeated layers; none for MoE (its experts replace the MLPs)."""
    if arm.method == "dus":
        return solar(arm.m).plan(n).new_layers
    if arm.method == "moe":
        return []
    return ws.plan(arm).new_layers


def repeat_train_config(train, repeat: int):
    """The CPT settings of repeat ``repeat`` of a configuration: another seed and another data order.

    Repeat 0 is the study's settings unchanged. Repeat r > 0 adds r to the seed (the MoE router
    initialisation and any dropout) and to the data order seed (None counts as 0), so it trains on
    the same CPT rows in another order; the held-out rows are the same for every repeat. Without
    the new order a DUS repeat would be the same computation again: DUS has no random init.
    """
    if repeat == 0:
        return train
    order = (train.data_order_seed or 0) + repeat
    return train.model_copy(update={"seed": train.seed + repeat, "data_order_seed": order})


def _evaluate(ws: Workspace, model, tokenizer, data, per_item: dict | None = None, *, last: bool = True) -> dict:
    """Every score of a model: held-out loss and perplexity, and each evaluation task (lm-eval's only at
    the ``last`` budget point with ``eval.tasks_at: last``); ``per_item`` receives the answer items'
    scores one by one (see :func:`ablate.synthetic.answer_metrics`)."""
    ev = ws.config.eval
    metrics = dict(perplexity(model, data.val, batch_size=ws.config.train.micro_batch_size))
    metrics.pop("tokens", None)
    for shots, tasks in ws.task_groups().items() if last or ev.tasks_at == "every" else ():
        metrics.update(evaluate(model, tokenizer, tasks, include_path=ws.tasks_dir, subset=ev.subset,
                                subset_seed=ev.subset_seed, num_fewshot=shots, batch_size=ev.batch_size,
                                progress=ws.progress))
    if ev.synthetic_tasks:  # the answer tokens' loss and accuracy per level k (objective answer_loss)
        metrics.update(answer_metrics(model, tokenizer, per_item=per_item))
    return metrics


def run_trial(ws: Workspace, arm, out_dir: Path | None, on_eval: Callable[[int, int, float], bool] | None = None,
              on_point: Callable[[int, float], bool] | None = None, keeper: TrialKeeper | None = None) -> dict:
    """Build, train and evaluate ``arm``; return its record (see :mod:`ablate.results` for the fields).

    Every budget point of the CPT run (one under schedule cosine, each of ``train.budgets`` under
    wsd) is evaluated in full and recorded in ``record["budgets"]``; the record's metrics and
    objective are the last point's. ``on_point(tokens, objective)`` sees each point's objective and
    may stop the run (the study's pruner). A run stopped early comes back with ``status="stopped"``
    and the points it reached. A non-finite loss raises :class:`TrialFailed`. Method ``nocpt`` is the
    base evaluated as it is: no surgery, no CPT, one point at 0 tokens. ``out_dir`` None writes nothing
    (the ranks > 0 of a worker of several processes: rank 0 writes the records).

    ``keeper`` (:mod:`ablate.keep`, rank 0 only) checks before CPT that a kept checkpoint fits on its
    disk and is offered the variant at every budget point, once the point is evaluated. A variant
    sharded over a worker's processes is gathered by all of them first, when rank 0 will keep it.
    """
    t0 = time.perf_counter()
    base, tokenizer = ws.base(arm.base)
    n = base.config.num_hidden_layers
    if arm.method == NOCPT:
        return _no_cpt_record(ws, arm, base, tokenizer, ws.data(tokenizer), t0, out_dir)
    train_cfg = repeat_train_config(train_config_for(ws.config.train, arm), arm.repeat)
    seq_len = ws.config.data.seq_len
    variant = build_variant(ws, arm, base)
    new_layers = new_layers_of(ws, arm, n)
    if train_cfg.trainable == "new" and not new_layers:  # nothing was added (control, prune, MoE): all train
        train_cfg = train_cfg.model_copy(update={"trainable": "all"})
    params = count_params(variant)
    s = variant.config.num_hidden_layers
    flops_per_token = training_flops_per_token(variant.config, params["active"], seq_len)
    nominal = train_cfg.budget_points  # in the study's unit: tokens, or FLOPs
    train_cfg = train_cfg.in_tokens(flops_per_token)
    data = ws.data(tokenizer, train_cfg.tokens)
    tps = train_cfg.tokens_per_step
    t1 = time.perf_counter()
    points: list[dict] = []
    eval_s = 0.0

    def evaluate_point(point, info) -> bool:
        nonlocal eval_s
        e0 = time.perf_counter()
        items: dict = {}
        metrics = _evaluate(ws, variant, tokenizer, data, items, last=point.index == len(nominal) - 1)
        objective = objective_value(metrics, ws.config.eval.objective)
        _write_items(out_dir, nominal[point.index], items, append=bool(points))
        eval_s += time.perf_counter() - e0
        points.append({"budget": nominal[point.index], "budget_tokens": point.tokens, "tokens": info["tokens"],
                       "flops": flops_per_token * info["tokens"], "steps": info["steps"],
                       "branch": info["branch"], "cpt_val_loss": info["val_loss"], "metrics": metrics,
                       "objective": objective, "eval_s": round(time.perf_counter() - e0, 3)})
        # Optuna's step: the point in the study's unit, in whole steps (pruner rungs are the same numbers)
        step = nominal[point.index] // tps * tps
        _offer(keeper, variant, tokenizer, facts, points[-1])
        stop = bool(on_point(step, objective)) if on_point is not None else False
        return distributed.share(stop)  # rank 0's pruner decides for every rank of a worker

    facts = {"n": n, "s": s, "params_total": params["total"], "params_active": params["active"],
             "flops_per_token": flops_per_token, "peak_lr": train_cfg.lr, "seed": train_cfg.seed,
             "data_order_seed": train_cfg.data_order_seed, "trainable": train_cfg.trainable,
             "schedule": train_cfg.schedule}
    if keeper is not None:
        keeper.check_room(variant, tokenizer)  # before CPT: a study that cannot keep its variant stops now
    result = continue_pretraining(variant, data, train_cfg, on_eval=on_eval, on_point=evaluate_point,
                                  out_dir=out_dir, progress=ws.progress, cpu=str(ws.device) == "cpu",
                                  new_layers=new_layers)
    t2 = time.perf_counter()
    record = {
        **arm.to_dict(), "n": n, "s": s, "seed": train_cfg.seed, "data_order_seed": train_cfg.data_order_seed,
        "peak_lr": train_cfg.lr, "budget_unit": ws.config.train.budget_unit, "params_total": params["total"],
        "params_active": params["active"], "trainable": train_cfg.trainable,
        "params_trainable": result.trainable_params,
        "tokens": result.tokens, "branch_tokens": result.branch_tokens,
        # training FLOPs: 6 x active parameters per token (forward and backward matmuls) plus attention
        # (6 x layers x seq_len x hidden, Kaplan et al. 2020); branches' cooldowns excluded (see branch_tokens)
        "flops": flops_per_token * result.tokens, "flops_per_token": flops_per_token,
        "device": str(ws.device), "status": result.status, "reason": result.reason, "schedule": train_cfg.schedule,
        "build_s": round(t1 - t0, 3), "train_s": round(t2 - t1 - eval_s, 3),
        "train": {"initial_val_loss": result.initial_val_loss, "final_val_loss": result.final_val_loss,
                  "tokens_per_s": result.tokens_per_s, "precision": result.precision,
                  "precision_choice": result.precision_choice},
        "budgets": points,
    }
    if arm.method not in ("dus", "moe"):  # which base layer each layer copies, and the zero-output ones
        plan = ws.plan(arm)
        record.update(plan=list(plan.sources), zero_output=plan.zero_layers)
    if result.status == "diverged":
        raise TrialFailed(result.reason)
    last = points[-1] if points else None
    record.update(metrics=last["metrics"] if last else {"val_loss": result.final_val_loss},
                  eval_s=round(eval_s, 3), wall_s=round(time.perf_counter() - t0, 3))
    if result.status == "completed":
        record["objective"] = last["objective"]
    variant = None  # free it now (evaluate_point holds the name)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return record


def _offer(keeper: TrialKeeper | None, variant, tokenizer, facts: dict, point: dict) -> None:
    """Offer ``point``'s variant to rank 0's keeper (the other ranks of a worker have none).

    A variant sharded over the worker's processes (FSDP) is gathered by every rank, a collective, and
    only when rank 0's keeper will write it: most points of a ``--keep best`` study keep nothing.
    """
    if not distributed.sharded(variant):
        if keeper is not None:
            keeper.offer(variant, tokenizer, facts, point)
        return
    if not distributed.share(keeper is not None and keeper.wants(point)):
        return
    state = distributed.full_state_dict(variant)  # the full tensors on rank 0's host, None elsewhere
    if keeper is not None:
        keeper.offer(variant, tokenizer, facts, point, state_dict=state)


def _no_cpt_record(ws: Workspace, arm, base, tokenizer, data, t0: float, out_dir: Path) -> dict:
    """The reference every study has: the base as it is, no CPT, scored like every arm."""
    params = count_params(base)
    t1 = time.perf_counter()
    items: dict = {}
    metrics = _evaluate(ws, base, tokenizer, data, items)
    _write_items(out_dir, 0, items, append=False)
    objective = objective_value(metrics, ws.config.eval.objective)
    t2 = time.perf_counter()
    n = base.config.num_hidden_layers
    point = {"budget": 0, "budget_tokens": 0, "tokens": 0, "flops": 0, "steps": 0, "branch": False,
             "cpt_val_loss": None, "metrics": metrics, "objective": objective, "eval_s": round(t2 - t1, 3)}
    return {**arm.to_dict(), "n": n, "s": n, "seed": None, "data_order_seed": None, "peak_lr": None,
            "params_total": params["total"], "params_active": params["active"], "tokens": 0, "branch_tokens": 0,
            "flops": 0, "flops_per_token": training_flops_per_token(base.config, params["active"], data.seq_len),
            "device": str(ws.device), "status": "completed", "reason": "the base as it is: no CPT",
            "schedule": None, "build_s": round(t1 - t0, 3), "train_s": 0.0, "budgets": [point],
            "metrics": metrics, "objective": objective, "eval_s": round(t2 - t1, 3), "wall_s": round(t2 - t0, 3)}


def _write_items(out_dir: Path | None, budget, items: dict, *, append: bool) -> None:
    """``items.jsonl`` in the trial folder: per budget point and task, every evaluation item's score
    (0/1 ``hit``, ``loss`` in nats), so intervals can resample items (``ablate.stats.item_gaps``)."""
    if not items or out_dir is None:
        return
    with open(Path(out_dir) / "items.jsonl", "a" if append else "w") as f:
        for task, scores in items.items():
            f.write(json.dumps({"budget": budget, "task": task, "hit": scores["hit"],
                                "loss": [round(x, 5) for x in scores["loss"]]}) + "\n")


class Objective:
    """``objective(trial) -> float``: the study's objective value of one sampled configuration."""

    def __init__(self, space: SearchSpace, workspace: Workspace, study_dir: Path, direction: str,
                 worker: Worker | None = None, group: distributed.Group | None = None, keeper: Keeper | None = None):
        self.group = group  # rank 0 of a worker of several processes: the others run each arm it sends
        self.space = space
        self.ws = workspace
        self.study_dir = Path(study_dir)
        self.direction = direction
        self.worker = worker
        self.keeper = keeper

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            # Optuna fails the trial; the mark keeps Ctrl-C from counting as a crash of this configuration
            with contextlib.suppress(Exception):
                trial.set_user_attr("interrupted", True)
            raise

    def _claim(self, trial: optuna.Trial):
        """Draw the configuration and make it this trial's, under the worker's sampling lock."""
        if self.worker is not None:
            self.worker.mark(trial)
        arm = self.space.suggest(trial)
        for key, value in arm.to_dict().items():
            trial.set_user_attr(key, value)
        if self.worker is None:
            return arm
        holders = self.space.holders(trial.study, exclude=trial.number).get(arm)
        self.worker.release()
        if holders:
            reason = f"duplicate of trial {holders[0]} (drawn by two workers at once); not run"
            trial.set_user_attr("duplicate_of", holders[0])
            trial.set_user_attr("fail_reason", reason)
            raise TrialFailed(reason)
        return arm

    def _run(self, trial: optuna.Trial) -> float:
        arm = self._claim(trial)
        if self.group is not None:  # an operator's plan too: one measured on each rank's GPU could differ
            plan = None
            if arm.method not in ("dus", "moe", NOCPT):
                with contextlib.suppress(Exception):  # a plan that fails fails in run_trial, on every rank
                    plan = self.ws.plan(arm)
            self.group.send({"arm": arm, "trial": trial.number, "plan": plan})
        sign = 1.0 if self.direction == "minimize" else -1.0  # pruners read intermediate values in the
        # study's direction, so a maximised objective gets minus the held-out loss

        wsd = self.ws.config.train.schedule == "wsd"

        def on_eval(step: int, tokens: int, val_loss: float) -> bool:
            if wsd:  # under wsd Optuna sees the budget points' objectives (at step = tokens), not these
                return False
            trial.report(sign * val_loss, step)
            return trial.should_prune()

        def on_point(tokens: int, objective: float) -> bool:
            if not wsd:  # the one point is the trial's value, told at the end
                return False
            trial.report(objective, tokens)
            return trial.should_prune()

        failure = None
        with atomic_dir(self.study_dir / "trials" / str(trial.number), overwrite=True) as folder:
            resolved = self.ws.config.model_dump(mode="json")
            atomic_write_text(folder / "config.yaml", yaml.safe_dump({"arm": arm.to_dict(), "study": resolved},
                                                                     sort_keys=False))
            env = environment(str(self.ws.device))
            atomic_write_json(folder / "env.json", env)
            keeper = self.keeper.for_trial(self.ws, arm, trial, env) if self.keeper is not None else None
            try:
                record = run_trial(self.ws, arm, folder, on_eval, on_point, keeper)
            except (KeyboardInterrupt, SystemExit, distributed.GroupLost):
                raise  # not the configuration's fault: the trial stays unrecorded and runs again
            except Exception as exc:  # any failure of this configuration is recorded, the study goes on
                if isinstance(exc, NoRoom):  # the disk's doing: stop the study, the configuration runs again
                    trial.set_user_attr("interrupted", True)
                if disk_full(exc) or isinstance(exc, NoRoom):
                    raise  # not the configuration's fault either: the study stops with one line, a rerun runs it
                failure = one_line(exc, with_type=True)
                record = {**arm.to_dict(), "status": "failed", "fail_reason": failure}
            others = self.group.together(failure) if self.group is not None else []  # a dead rank: GroupLost
            if failure is None and others:  # rank 0's part finished, another rank's did not
                failure = others[0]
                record = {**arm.to_dict(), "status": "failed", "fail_reason": failure}
            record["trial"] = trial.number
            atomic_write_json(folder / "result.json", record)
        if failure is not None:
            trial.set_user_attr("fail_reason", failure)
            raise TrialFailed(failure)
        if record["status"] == "stopped":
            raise optuna.TrialPruned(record.get("reason", "pruned"))
        return float(record["objective"])


def environment(device: str) -> dict:
    """Versions, device and git commit, for ``env.json`` beside every trial."""
    import importlib.metadata as md

    import torch

    versions = {}
    for pkg in ("ablate", "torch", "transformers", "accelerate", "optuna", "lm-eval", "datasets", "tokenizers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "versions": versions, "python": platform.python_version(), "platform": platform.platform(),
        "device": device, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(), "git_commit": commit,
    }


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
