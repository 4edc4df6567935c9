"""The study configuration: one validated schema for every ``studies/*.yaml``.

Unknown keys are errors, every field carries a description, and a validation error
names the key path that is wrong (``train.lr: ...``). ``--set key.path=value``
overrides are applied to the YAML before validation, their values parsed as YAML.
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ablate.data import DataSource, parse_source
from ablate.errors import UserError, one_line
from ablate.objective import ObjectiveConfig
from ablate.plan import PlanError, parse_plan
from ablate.train import TrainConfig

__all__ = ["StudyConfig", "BaseConfig", "load_study_config", "parse_config", "DEFAULT_CONFIG", "rung_points",
           "config_changes",
           "prunable"]

DEFAULT_CONFIG = Path(__file__).parent / "studies" / "default.yaml"
# \Z, not $: "$" also matches before a final newline, which would let "evil\n" name a folder
NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
# Bounds on what a config may ask for: a study enumerates its configurations, and YAML aliases
# expand into copies; far beyond any real study, far below what exhausts memory.
MAX_REPEATS = 1_000
MAX_BASES = 100
MAX_M_VALUES = 1_024
MAX_EXPERTS = 1_024
MAX_OPERATORS = 1_024
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 1_000
MAX_YAML_NODES = 100_000
Finite = dict(allow_inf_nan=False)  # NaN / inf are refused with the field's name


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseConfig(Strict):
    """One base model of the study."""

    model: str = Field(description="A zoo name (python -m ablate.zoo list), a local HF checkpoint folder, "
                       "or a hub id such as HuggingFaceTB/SmolLM2-135M.")
    label: str | None = Field(None, description="Short name in tables and plots; default: the model's last "
                              "path component.")
    m: list[int] | None = Field(None, max_length=MAX_M_VALUES,
                                description="The m values to try (layers removed from each copy). "
                                "Default: the up-scaling range 0..n/2, where n/2 is the unchanged base.")

    moe: bool = Field(True, description="Include the MoE upcycle baseline for this base (Llama and Mistral "
                      "families only; set false for others).")

    @field_validator("m")
    @classmethod
    def _m_values(cls, value):
        if value is not None:
            if not value:
                raise ValueError("the m list is empty; list at least one m, or remove the key for 0..n/2")
            if len(set(value)) != len(value):
                raise ValueError(f"the m list {value} repeats a value")
        return value

    @property
    def name(self) -> str:
        return self.label or Path(self.model.rstrip("/")).name


class MoEConfig(Strict):
    """The Mixtral-style upcycle baseline."""

    experts: int = Field(4, ge=1, le=MAX_EXPERTS, description="Experts per layer, each a copy of the base MLP.")
    top_k: int = Field(2, ge=1, le=MAX_EXPERTS, description="Experts used per token.")
    router_std: float | None = Field(None, gt=0, **Finite, description="Router init std; default the base model's "
                                     "initializer_range.")
    expert_noise: float = Field(0.0, ge=0, **Finite, description="Relative noise on expert copies to break their "
                                "symmetry (0: the upcycle starts as exactly the base).")

    @model_validator(mode="after")
    def _k(self):
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class MethodsConfig(Strict):
    """Which arms the study compares."""

    dus: bool = Field(True, description="Depth up-scaling over the m range of each base.")
    moe: MoEConfig | None = Field(default_factory=MoEConfig, description="The MoE upcycle baseline; null "
                                  "to leave it out.")
    nocpt: bool = Field(True, description="The reference row of every study: each base as it is, with no CPT at "
                        "all, evaluated once per base (whatever repeats and lr grid); it shows what CPT itself "
                        "does to the base, apart from any change of architecture.")
    operators: list[str] = Field(default_factory=list, max_length=MAX_OPERATORS, description="Growth and pruning "
                                 "operators beyond SOLAR's DUS, each an arm of every base with the same CPT, written "
                                 "as ablate.plan spells them: 'llama_pro(2)', 'stack(2)', 'mid(1, 2, 2)', "
                                 "'similar(1)', 'prune(1, by=angular)' (similar and prune by angular/influence measure "
                                 "the base on the study's held-out rows). The operator is the arm's method in every "
                                 "table. DUS itself is methods.dus over bases[].m.")

    @field_validator("operators", mode="before")
    @classmethod
    def _split_by_yaml(cls, value):
        if isinstance(value, list) and not all(isinstance(v, str) for v in value):
            raise ValueError(f"{value} is not a list of operators: YAML splits an unquoted [...] list at every comma, "
                             "so quote each operator: [\"mid(10, 6, 2)\", \"prune(4, by=angular)\"]")
        return value

    @field_validator("operators")
    @classmethod
    def _operators(cls, value):
        out = []
        for text in value:
            try:
                op = parse_plan(text)
            except PlanError as exc:
                raise ValueError(str(exc)) from None
            if op.family == "solar":
                raise ValueError(f"{op} is DUS: set methods.dus: true and list m={op.args[0]} in bases[].m")
            if str(op) in out:
                raise ValueError(f"{op} is listed twice")
            out.append(str(op))  # the canonical spelling: the method name in records and tables
        return out


class DataConfig(Strict):
    """CPT and held-out text."""

    source: DataSource = Field(default_factory=lambda: DataSource(kind="synthetic"),
                               description="'synthetic', a local path, 'hf:org/name[:config]', or a mapping "
                               "of DataSource fields.")
    seq_len: int = Field(128, gt=1, description="Tokens per training row.")
    val_tokens: int = Field(16_384, gt=0, description="Held-out tokens for the validation loss and perplexity.")
    seed: int = Field(0, ge=0, description="Seed of the data order (the same for every trial).")

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value):
        if isinstance(value, dict) and list(value) == ["hf"]:  # YAML reads "hf:" and "hf: org/name" as mappings
            return parse_source(f"hf:{value['hf'] if value['hf'] is not None else ''}")
        return parse_source(value) if isinstance(value, str) else value


class TaskSpec(Strict):
    """An lm-eval task with its own few-shot count."""

    name: str = Field(description="lm-eval task name, e.g. arc_challenge.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples for this task; null: eval.num_fewshot.")


class EvalConfig(Strict):
    """The fast evaluation after CPT."""

    synthetic_tasks: bool = Field(True, description="Evaluate on the built-in synthetic tasks (one per "
                                  "difficulty level k).")
    tasks: list[str | TaskSpec] = Field(default_factory=list, description="lm-eval tasks: names, or "
                                        "{name, num_fewshot} for a task with its own few-shot count.")
    subset: int | None = Field(100, gt=0, description="Items per task: a fixed random subset, the same for "
                               "every trial (never the first N). null: every item.")
    subset_seed: int = Field(0, ge=0, description="Seed of the fixed subset.")
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; null: each task's default.")
    batch_size: int = Field(32, gt=0, description="lm-eval batch size.")
    tasks_at: Literal["every", "last"] = Field("every", description="When the lm-eval tasks (the synthetic "
                                               "ones included) run: at every budget point, or only at the last "
                                               "one. Each lm-eval pass costs seconds; the held-out loss and the "
                                               "answer metrics (answer_k<k>/acc equals the synthetic task's acc, "
                                               "tested) are measured at every point either way.")

    def task_groups(self) -> dict[int | None, list[str]]:
        """Task names grouped by few-shot count (lm-eval takes one count per call)."""
        groups: dict[int | None, list[str]] = {}
        for task in self.tasks:
            name, shots = (task, self.num_fewshot) if isinstance(task, str) else \
                (task.name, task.num_fewshot if task.num_fewshot is not None else self.num_fewshot)
            groups.setdefault(shots, []).append(name)
        return groups
    objective: ObjectiveConfig = Field(default_factory=lambda: ObjectiveConfig(kind="val_loss"),
                                       description="The single value Optuna optimises.")


class SamplerConfig(Strict):
    """How trials pick (base, method, m, repeat)."""

    kind: Literal["sweep", "tpe", "random", "grid"] = Field(
        "sweep", description="sweep (the default): every configuration in a fixed order, all of repeat 0 "
        "before any repeat 1, so each base's whole m range is covered first; tpe: Optuna's TPE (for "
        "spaces too large to sweep; it favours the base with the better objective); random: uniform; "
        "grid: every configuration, in random order.")
    seed: int = Field(0, ge=0, description="Sampler seed.")


class PrunerConfig(Strict):
    """Early stopping of hopeless trials from their intermediate values during CPT."""

    kind: Literal["none", "median", "hyperband", "successive_halving"] = Field(
        "none", description="none (the default): every trial runs its whole budget. median: Optuna's "
        "MedianPruner on the held-out loss (schedule cosine: at each evaluation) or on the objective of each "
        "budget point (schedule wsd). hyperband / successive_halving: multi-fidelity search with Optuna's "
        "HyperbandPruner / SuccessiveHalvingPruner, the budget points of train.budgets as rungs (needs schedule "
        "wsd and at least 2 budget points). Off by default because a fresh DUS variant's held-out loss first "
        "jumps, then recovers: a median rule on early evaluations prunes exactly the arms under study (the first "
        "default study lost 10 of 20 trials, mostly DUS variants still recovering).")
    startup_trials: int = Field(5, ge=0, description="median: trials that always run to the end before pruning "
                                "starts.")
    warmup_evals: int = Field(2, ge=0, description="median: evaluations of a trial (schedule wsd: budget points) "
                              "before it may be pruned; set it past the recovery of a fresh variant (e.g. all but "
                              "the last).")
    reduction_factor: int = Field(4, ge=2, le=1_000, description="hyperband / successive_halving: the rungs are "
                                  "budgets[0] * reduction_factor**k tokens, and about 1 in reduction_factor trials "
                                  "goes on from each rung; 4 suits budget points a factor 4 apart.")
    min_fraction: float = Field(0.25, ge=0, le=1, **Finite, description="Every pruner: no trial is pruned before "
                                "it has trained this fraction of train.tokens (nor after its last budget point, "
                                "when nothing is left to save). A fresh variant's loss first jumps, then recovers: "
                                "the median rule on early losses pruned exactly the arms under study (the first "
                                "default study lost 10 of 20 trials, mostly DUS variants still recovering).")


class StudyConfig(Strict):
    """A whole study: which bases and arms, on what data and budget, scored how."""

    name: str = Field(description="Study name: letters, digits, '.', '_', '-' (it names a folder).")
    description: str = Field("", description="The question the study asks.")
    bases: list[BaseConfig] = Field(min_length=1, max_length=MAX_BASES, description="Base models.")
    methods: MethodsConfig = Field(default_factory=MethodsConfig, description="Arms to compare.")
    data: DataConfig = Field(default_factory=DataConfig, description="CPT and held-out text.")
    train: TrainConfig = Field(description="CPT settings; tokens is the budget shared by every arm.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation after CPT.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig, description="Trial sampler.")
    pruner: PrunerConfig = Field(default_factory=PrunerConfig, description="Trial pruner.")
    repeats: int = Field(1, ge=1, le=MAX_REPEATS, description="Seeds per configuration (base, method, m).")
    trust_remote_code: bool = Field(False, description="Allow hub models' own code (off: only transformers' "
                                    "built-in architectures run). Takes effect only with --trust-remote-code "
                                    "on the command line, so a config file alone never runs code.")
    # What a run leaves behind, not what it measures: excluded from the recorded config (study.json,
    # the storage's copy), so a rerun may change them and every study from before them continues.
    keep: Literal["best", "all", "none"] = Field("best", exclude=True, description="Trained variants saved as "
                                                 "Hugging Face checkpoints with a model card under <study>/kept/: "
                                                 "best (per base, operator and budget point, the best trial's, "
                                                 "replaced by a better one), all (every trial's) or none "
                                                 "(--keep on the command line).")
    log_with: Literal["tensorboard", "wandb", "mlflow"] | None = Field(
        None, exclude=True, description="Experiment tracker each trial is logged to through accelerate: its "
        "CPT curves, budget points' scores, final metrics and config (--log-with; needs the extra of the same "
        "name, pip install 'ablate[tensorboard]').")

    @field_validator("name")
    @classmethod
    def _name(cls, value):
        if not NAME.match(value):
            raise ValueError(f"study name {value!r} must be letters, digits, '.', '_' or '-' (no path separators)")
        if value in {".", ".."}:
            raise ValueError("study name cannot be '.' or '..'")
        return value

    @model_validator(mode="after")
    def _arms(self):
        if not self.methods.dus and self.methods.moe is None and not self.methods.operators:
            raise ValueError("methods: both dus and moe are off and no operators are listed; enable at least one")
        labels = [b.name for b in self.bases]
        if len(set(labels)) != len(labels):
            raise ValueError(f"bases: labels {labels} repeat; give each base a distinct label")
        idle = [b.name for b in self.bases if not self.methods.dus and not b.moe and not self.methods.operators]
        if idle:
            raise ValueError(f"bases: {idle[0]!r} has no arm to run (methods.dus is off and its moe is false); set "
                             "its moe: true, or methods.dus: true")
        return self

    @model_validator(mode="after")
    def _objective(self):
        objective = self.eval.objective
        synthetic = [k for k in objective.keys if re.match(r"(answer|answer_k\d+|synth_k\d+)/", k)]
        if not self.eval.synthetic_tasks and (objective.kind in ("answer_loss", "answer_acc") or synthetic):
            what = f"kind {objective.kind}" if not synthetic else f"key {synthetic[0]}"
            raise ValueError(f"eval.objective {what} is measured on the synthetic tasks; set eval.synthetic_tasks: "
                             "true, or choose another objective")
        from_tasks = [k for k in objective.keys if not re.match(r"(answer|answer_k\d+|val_loss|val_ppl)(/|$)", k)]
        if self.eval.tasks_at == "last" and from_tasks:
            raise ValueError(f"eval.objective key {from_tasks[0]} is an lm-eval result, measured only at the last "
                             "budget point with eval.tasks_at: last; set eval.tasks_at: every, or use an objective "
                             "measured at every point (val_loss, answer_loss, answer_acc, answer_k<k>/...)")
        return self

    @model_validator(mode="after")
    def _pruner(self):
        kind, train = self.pruner.kind, self.train
        if kind not in ("hyperband", "successive_halving"):
            return self
        points = train.budget_points
        if train.schedule != "wsd" or len(points) < 2:
            raise ValueError(f"pruner.kind {kind} needs train.schedule: wsd with at least 2 train.budgets (its rungs, "
                             "e.g. [16384, 65536]); set them, or use pruner.kind median or none")
        rungs = rung_points(points, self.pruner.reduction_factor)
        if not prunable(rungs, train.tokens, self.pruner.min_fraction):
            raise ValueError(f"pruner.kind {kind} would never prune: its rungs fall at budget points {rungs}, and none "
                             f"is both at least pruner.min_fraction={self.pruner.min_fraction:g} of train.tokens="
                             f"{train.tokens} and before the last; add a budget point budgets[0] * reduction_factor**k "
                             "there, or lower pruner.min_fraction or pruner.reduction_factor")
        return self


def config_changes(recorded: object, mine: dict, limit: int = 4) -> str:
    """Where a study's recorded config (a dumped dict) and ``mine`` differ, for a one-line error:
    ``train.lr, eval.tasks_at (new in this ablate)``. A key the recorded config lacks was added
    to ablate after the study started; with several differences, the first ``limit`` and a count."""
    changes: list[str] = []

    def walk(old, new, path: str) -> None:
        if isinstance(old, dict) and isinstance(new, dict) and (set(old) & set(new) or not (old or new)):
            for key in sorted(set(old) | set(new), key=str):
                where = f"{path}.{key}" if path else str(key)
                if key not in old:
                    changes.append(f"{where} (new in this ablate)")
                elif key not in new:
                    changes.append(f"{where} (no longer in this ablate)")
                elif old[key] != new[key]:
                    walk(old[key], new[key], where)
        elif old != new:
            changes.append(path or "the whole config")

    walk(recorded, mine, "")
    shown = ", ".join(changes[:limit])
    return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


def rung_points(budgets: list[int], reduction_factor: int) -> list[int]:
    """The budget points where successive halving (and each bracket of Hyperband) compares trials.

    Its rungs are at ``budgets[0] * reduction_factor**k`` tokens; a trial reports only at budget
    points, so each rung is decided at the first point at or past it (the same point for every
    trial, so the values a rung compares were all measured at one budget).
    """
    out, step = [], budgets[0]
    while step <= budgets[-1]:
        point = next(b for b in budgets if b >= step)
        if point not in out:
            out.append(point)
        step *= reduction_factor
    return out


def prunable(steps: list[int], full: int, min_fraction: float) -> list[int]:
    """The reported steps where the pruner's guard lets a trial be pruned: at least ``min_fraction``
    of the full budget ``full`` (in the same unit), and before it."""
    return [s for s in steps if min_fraction * full <= s < full]


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise UserError(f"--set {dotted}: {key!r} is not inside a mapping")
        node = node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"--set {dotted}: cannot set {last!r} there")


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with bounds. PyYAML has no limit on aliases: ten nested anchors of ten
    aliases each (a "YAML bomb") expand to 10**10 nodes once anything walks the tree, and an anchor
    that refers to itself makes every walk recurse forever. This loader counts alias events while
    composing and refuses a document with more than MAX_YAML_ALIASES aliases, more than
    MAX_YAML_NODES nodes with every alias expanded, or an alias inside its own anchor."""

    aliases = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_YAML_ALIASES} aliases (*name); "
                                                  "a study config needs few", self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node


def _expanded_size(node, sizes: dict, open_: set) -> int:
    """Nodes under ``node`` with aliases expanded (memoised, so a bomb is measured without expanding it)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "an alias refers to its own anchor (a recursive "
                                          "structure)", node.start_mark)
    open_.add(key)
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    size = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(key)
    if size > MAX_YAML_NODES:
        raise yaml.composer.ComposerError(None, None, f"over {MAX_YAML_NODES:,} values once its aliases are "
                                          "expanded (a YAML bomb?)", node.start_mark)
    sizes[key] = size
    return size


def load_yaml(text: str):
    """``yaml.safe_load`` with bounds on aliases and size (:class:`_BoundedLoader`); raises yaml.YAMLError."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def _union(annotation) -> tuple:
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def _child(annotation, key: str):
    """The annotation of ``key`` inside a value of type ``annotation`` (None when unknown)."""
    for option in _union(annotation):
        if isinstance(option, type) and issubclass(option, BaseModel) and key in option.model_fields:
            return option.model_fields[key].annotation
        if get_origin(option) in (list, tuple) and key.isdigit() and get_args(option):
            return get_args(option)[0]
    return None


def _leaves(annotation) -> set:
    """The plain types a field accepts (str for a Literal of strings)."""
    out = set()
    for option in _union(annotation):
        out |= {type(v) for v in get_args(option)} if get_origin(option) is Literal else {option}
    return out


def _as_text(dotted: str, value, raw: str):
    """An override's YAML-typed value, or its text where the field takes text: ``--study 123`` and
    ``--study true`` name studies "123" and "true", not the number 123 and the boolean True."""
    annotation = StudyConfig
    for key in dotted.split("."):
        annotation = _child(annotation, key) if annotation is not None else None
    if annotation is None or isinstance(value, str) or not isinstance(value, (int, float, bool, type(None))):
        return value
    leaves = _leaves(annotation)
    if str in leaves and type(value) not in leaves and not (isinstance(value, int) and float in leaves
                                                             and not isinstance(value, bool)):
        return raw.strip()
    return value


def _refuse_bools(node, annotation, where: str, path: str = "") -> None:
    """YAML's true/false where the schema wants a number: pydantic would read true as 1."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = _child(annotation, str(key))
            if child is None:
                continue
            here = f"{path}.{key}" if path else str(key)
            if isinstance(value, bool) and bool not in _leaves(child) and _leaves(child) & {int, float}:
                raise UserError(f"{where}: {here}: expected a number, got {str(value).lower()} (true/false are "
                                "not numbers)")
            _refuse_bools(value, child, where, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            child = _child(annotation, str(i))
            if child is None:
                continue
            if isinstance(value, bool) and bool not in _leaves(child) and _leaves(child) & {int, float}:
                raise UserError(f"{where}: {path}.{i}: expected a number, got {str(value).lower()}")
            _refuse_bools(value, child, where, f"{path}.{i}")


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides; values are parsed as YAML (``1e-3`` becomes a float),
    except where the field takes text (``--set name=123`` is the name "123").

    ``--set train.budgets=[...]`` without ``--set train.tokens=...`` drops the file's ``train.tokens``,
    which then defaults to the last budget point: the command line's budget points are the run."""
    keys = {item.partition("=")[0].strip() for item in overrides}
    if "train.budgets" in keys and "train.tokens" not in keys and isinstance(tree.get("train"), dict):
        tree["train"].pop("tokens", None)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set {item!r} is not key.path=value (e.g. --set train.lr=1e-3)")
        try:
            value = load_yaml(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            value = _number(value)
        _set(tree, key.strip(), _as_text(key.strip(), value, raw))
    return tree


def _number(text: str):
    """PyYAML reads ``1e-5`` (no dot) as a string; numbers written so are numbers here."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() and re.fullmatch(r"[+-]?\d+", text.strip()) else value


def _coerce_numbers(node, annotation=None):
    """``1e-5`` strings as floats, except in fields that take text (a study named "1e3")."""
    if isinstance(node, dict):
        return {k: _coerce_numbers(v, _child(annotation, str(k)) if annotation is not None else None)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_coerce_numbers(v, _child(annotation, str(i)) if annotation is not None else None)
                for i, v in enumerate(node)]
    if isinstance(node, str) and re.fullmatch(r"\s*[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*", node) \
            and (annotation is None or str not in _leaves(annotation)):
        return float(node)
    return node


def format_error(exc: ValidationError, where: str) -> str:
    """The first validation error as one line naming the key path, plus how many more there are."""
    errors = exc.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check its spelling against the schema in ablate/config.py)"
    elif first["type"] == "missing":
        msg = "required key is missing"
    got = first.get("input")
    if first["type"] == "string_type" and isinstance(got, (bool, int, float)):
        msg += "; YAML read it as a number or true/false: quote it (e.g. name: \"123\")"
    hide = first["type"] in {"missing", "extra_forbidden"} or isinstance(got, (dict, list))
    shown = "" if hide else f" (got {got!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {loc}: {msg}{shown}{more}"


def parse_config(tree: object, where: str = "config") -> StudyConfig:
    """Validate a parsed YAML tree; a UserError names the key that is wrong."""
    if not isinstance(tree, dict):
        raise UserError(f"{where}: the top level must be a mapping of keys (name, bases, train, ...)")
    tree = _coerce_numbers(tree, StudyConfig)
    _refuse_bools(tree, StudyConfig, where)
    try:
        return StudyConfig.model_validate(tree)
    except ValidationError as exc:
        raise UserError(format_error(exc, where)) from None


def load_study_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML (default: the packaged default study), apply overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if path.is_dir():
        raise UserError(f"study config {path} is a folder; pass --config PATH to a studies/*.yaml file in it")
    if not path.is_file():
        raise UserError(f"study config {path} does not exist; pass --config PATH to a studies/*.yaml file")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"study config {path} is {path.stat().st_size:,} bytes, over the {MAX_CONFIG_BYTES:,} a "
                        "study YAML may have; pass --config PATH to a studies/*.yaml file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not a UTF-8 text file (byte {exc.start} is {data[exc.start:exc.start + 1]!r}); "
                        "pass --config PATH to a study YAML file") from None
    try:
        tree = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{at}: {one_line(getattr(exc, 'problem', None) or exc)}") from None
    tree = apply_overrides(tree if isinstance(tree, dict) else {}, overrides or []) if overrides else tree
    return parse_config(tree, str(path))
