"""Continued pretraining (CPT) of a causal LM on a fixed token budget.

One job: take a model and a :class:`~ablate.data.PackedData`, train it for exactly
``TrainConfig.tokens // tokens_per_step`` optimizer steps (AdamW, linear warmup then
cosine decay, gradient clipping and accumulation), measure held-out loss along the way
and report it to a callback that may stop the run (the study's Optuna pruner).

The same function runs on CPU, on one GPU, and under ``torchrun`` / ``accelerate launch``
(``distributed: ddp``, or ``fsdp``: FSDP2 shards, :func:`ablate.distributed.shard`): every
rank reads a disjoint slice of each step's rows, so the global tokens per step stay
``tokens_per_step`` whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydantic
import torch
from pydantic import Field

from ablate import distributed
from ablate import precision as precisions
from ablate.data import SHUFFLE_WINDOW, PackedData
from ablate.errors import UserError
from ablate.torchutil import evaluating

__all__ = [
    "Budget",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "check_processes",
    "continue_pretraining",
    "lr_at",
    "wsd_lr_at",
    "early_eval_steps",
    "BudgetPoint",
    "plan_points",
    "plan_budget",
    "resolve_precision",
    "row_order",
    "train_only_layers",
]

Finite = dict(allow_inf_nan=False)  # NaN / inf are rejected with the field's name in the message


class TrainConfig(pydantic.BaseModel, extra="forbid"):
    """Settings of one CPT run. ``tokens`` is the budget, the same for every arm of a study."""

    tokens: int = Field(gt=0, description="CPT budget in training tokens (in FLOPs with budget_unit flops); "
                        "trained tokens are "
                        "(tokens // tokens_per_step) * tokens_per_step, stated in the result.")
    micro_batch_size: int = Field(8, gt=0, description="Rows per forward/backward pass on each "
                                  "process; lower it when memory runs out, it does not change the maths.")
    tokens_per_step: int = Field(16_384, gt=0, description="Global tokens per optimizer step; must "
                                 "be a multiple of micro_batch_size * seq_len * processes (the rest "
                                 "is gradient accumulation). 16k suits small models on a short budget.")
    lr: float | list[float] = Field(3e-4, description="Peak learning rate, or a small grid of them "
                                    "([1e-3, 3e-3]): a nuisance variable, so a study runs every arm at every lr "
                                    "of the grid and compares each arm at its best lr (chosen on held-out "
                                    "loss). 3e-4 is the usual small-Llama peak.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, **Finite, description="Final learning rate as a "
                                "fraction of lr (cosine floor; 0.1 as in Chinchilla and nanoGPT).")
    warmup: float = Field(0.05, ge=0, lt=1, **Finite, description="schedule cosine: linear warmup length "
                          "as a fraction of the optimizer steps (a fraction so it scales with the budget).")
    schedule: Literal["cosine", "wsd"] = Field("cosine", description="cosine: warmup then cosine decay to "
                                               "min_lr over the one budget `tokens`. wsd (warmup-stable-decay): "
                                               "warmup, constant lr, then a cooldown over the last `cooldown` "
                                               "fraction of each budget point of `budgets`, each cooldown a "
                                               "branch forked off the constant-lr run (Hägele et al. 2024).")
    budgets: list[int] | None = Field(None, description="schedule wsd: the budget points in tokens, ascending, "
                                      "the last equal to `tokens` (default [tokens]); every point is evaluated "
                                      "and recorded. A branch at b equals, bit for bit on CPU, a run with "
                                      "tokens: b and budgets: [b].")
    cooldown: float = Field(0.2, gt=0, lt=1, **Finite, description="schedule wsd: the cooldown's share of each "
                            "budget point (0.2: the last 20% of its steps decay the lr to min_lr).")
    decay: Literal["1-sqrt", "linear"] = Field("1-sqrt", description="schedule wsd: the cooldown's shape, "
                                               "lr * (1 - sqrt(t)) or lr * (1 - t) from the peak to min_lr "
                                               "(1-sqrt matched cosine in Hägele et al. 2024; linear did not).")
    warmup_tokens: int | None = Field(None, ge=0, description="Warmup in tokens (rounded to whole steps); "
                                      "schedule wsd needs it, since its warmup must not depend on the budget "
                                      "points; with cosine it replaces the `warmup` fraction.")
    budget_unit: Literal["tokens", "flops"] = Field("tokens", description="tokens: `tokens` and `budgets` are "
                                                    "CPT tokens, the same for every arm. flops: they are training "
                                                    "FLOPs (e.g. 1.0e12), and each arm trains budget / its training "
                                                    "FLOPs per token tokens (6 x active parameters plus attention), "
                                                    "so a deeper or MoE arm trains fewer tokens: equal compute.")
    branch_state: Literal["memory", "disk"] = Field("memory", description="schedule wsd: where the state at a "
                                                    "fork waits while its branch trains: a copy in memory "
                                                    "(parameters and AdamW moments: about 3x the fp32 weights) "
                                                    "or a checkpoint file in the trial folder (for models where a "
                                                    "second copy does not fit).")
    weight_decay: float = Field(0.1, ge=0, **Finite, description="AdamW decoupled weight decay on "
                                "matrices and embeddings only, never on norms or biases (Llama: 0.1).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas; beta2=0.95 is the "
                                       "Llama/GPT-3 choice, steadier than 0.999 on short runs.")
    grad_clip: float = Field(1.0, ge=0, **Finite, description="Clip the global gradient norm to "
                             "this value; 0 turns clipping off (the norm is still logged).")
    eval_every: int = Field(50, gt=0, description="Measure held-out loss every this many optimizer "
                            "steps (and always after the last step).")
    eval_early: int = Field(5, ge=0, le=30, description="Also measure held-out loss at the log-spaced steps 1, 2, "
                            "4, ..., 2**(eval_early - 1) (those within the budget and not already an eval_every "
                            "step), to draw a fresh variant's jump and recovery right after surgery; written to "
                            "metrics.jsonl like the others, but never reported to the pruner (on_eval), so "
                            "pruning and pruner.warmup_evals count the eval_every evaluations only. 0: none.")
    eval_rows: int = Field(64, gt=0, description="Held-out loss uses the first eval_rows rows of "
                           "data.val, the same fixed rows for every trial.")
    seed: int = Field(0, ge=0, description="Seeds torch, numpy and random; a CPU run repeats bit "
                      "for bit.")
    data_order_seed: int | None = Field(None, ge=0, description="None: training rows in their stored "
                                        "order. An int: the budget's rows in a fixed permutation drawn "
                                        "from it, so runs see the same tokens in another order and the "
                                        "held-out rows stay untouched (a study's repeats use this: DUS has "
                                        "no random initialisation, so a new seed alone changes nothing).")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="Compute precision: "
                                                       "'bf16' autocast, 'fp32', or 'auto' = bf16 "
                                                       "where the device runs it natively, else fp32.")
    trainable: Literal["all", "new"] = Field("all", description="all: every parameter trains. new: only the "
                                             "decoder layers the arm's operator added (LLaMA Pro's recipe: the "
                                             "embeddings, head, norms and the base's own blocks stay frozen, "
                                             "bit for bit); an arm that adds no layer (the control m = n/2, "
                                             "prune, MoE) trains every parameter, and each trial records which "
                                             "and how many parameters trained.")
    distributed: Literal["ddp", "fsdp"] = Field("ddp", description="With several processes (torchrun / "
                                                "accelerate launch): ddp keeps a whole replica of the model, "
                                                "gradients and AdamW state on every process; fsdp shards them "
                                                "(FSDP2, fully_shard per decoder layer; bf16 compute, fp32 master "
                                                "weights on GPUs) for models one GPU cannot hold. One process: "
                                                "ddp is plain training, fsdp needs a launcher.")
    compile: bool | Literal["layers"] = Field(False, description="torch.compile the training forward. true: "
                                              "the whole model (a compile of tens of seconds per model shape). "
                                              "layers: each block on its own (accelerate's compile_regions): "
                                              "every decoder layer shares one compiled graph, so a process "
                                              "compiles once (~20 s cold, ~3 s from torch's on-disk cache) and "
                                              "every later depth of the same width reuses it. Held-out loss and "
                                              "evaluation stay eager. Off by default so short runs and tests do "
                                              "not pay it.")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _tokens_from_budgets(cls, data):
        """``budgets`` alone gives ``tokens``: the last budget point is the whole run."""
        if isinstance(data, dict) and data.get("tokens") is None and isinstance(data.get("budgets"), list) \
                and data["budgets"] and all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                            for b in data["budgets"]):
            data = {**data, "tokens": max(data["budgets"])}
        return data

    @pydantic.field_validator("lr")
    @classmethod
    def _lrs(cls, lr):
        values = lr if isinstance(lr, list) else [lr]
        if not values:
            raise ValueError("the lr grid is empty; give one lr or a list of them")
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError("every lr must be a positive finite number")
        if len(set(values)) != len(values):
            raise ValueError(f"the lr grid {lr} repeats a value")
        if isinstance(lr, list) and len(lr) == 1:
            return lr[0]
        return lr

    @pydantic.field_validator("budgets")
    @classmethod
    def _budgets(cls, budgets):
        if budgets is not None:
            if not budgets:
                raise ValueError("the budget list is empty; list at least one budget point, or remove the key")
            if any(b <= 0 for b in budgets):
                raise ValueError(f"budget points must be positive token counts, got {budgets}")
            if list(budgets) != sorted(set(budgets)):
                raise ValueError(f"budget points {budgets} must be strictly increasing")
        return budgets

    @pydantic.model_validator(mode="after")
    def _schedule(self):
        if self.budgets is not None:
            if self.schedule != "wsd":
                raise ValueError("budgets need schedule: wsd (each budget point is a cooldown branch); "
                                 "set train.schedule=wsd or remove train.budgets")
            if self.budgets[-1] != self.tokens:
                raise ValueError(f"the last budget point {self.budgets[-1]} must equal tokens={self.tokens}; set "
                                 "tokens to it, or leave tokens out (it defaults to the last budget point)")
        if self.schedule == "wsd" and self.warmup_tokens is None:
            raise ValueError("schedule wsd needs train.warmup_tokens (the warmup in tokens, the same for every "
                             "budget point; e.g. a tenth of the first budget point)")
        return self

    def in_tokens(self, flops_per_token: int) -> TrainConfig:
        """These settings with the budget in tokens for an arm of ``flops_per_token`` training FLOPs per
        token (budget_unit flops; the same settings under tokens). Each point rounds down to whole steps."""
        if self.budget_unit == "tokens":
            return self
        step = self.tokens_per_step

        def convert(flops: int) -> int:
            tokens = flops // flops_per_token // step * step
            if tokens == 0:
                raise UserError(f"the FLOP budget {flops:.3g} is less than one step of {step} tokens for an arm "
                                f"of {flops_per_token:,} training FLOPs per token ({step * flops_per_token:.3g} "
                                "FLOPs); raise the budget or lower tokens_per_step")
            return tokens

        budgets = [convert(b) for b in self.budgets] if self.budgets else None
        if budgets and len(set(budgets)) != len(budgets):
            raise UserError(f"the FLOP budgets {self.budgets} round to the same steps ({budgets} tokens) for an arm "
                            f"of {flops_per_token:,} FLOPs per token; space them further apart")
        return self.model_copy(update={"budget_unit": "tokens", "tokens": convert(self.tokens), "budgets": budgets})

    @property
    def lr_grid(self) -> list[float]:
        """The learning rates a study runs every arm at (one, or the grid)."""
        return list(self.lr) if isinstance(self.lr, list) else [self.lr]

    @property
    def budget_points(self) -> list[int]:
        """The budget points in tokens: ``budgets``, or the one budget ``tokens``."""
        return list(self.budgets) if self.budgets else [self.tokens]

    @pydantic.field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {betas}")
        return betas


@dataclass(frozen=True)
class Budget:
    """How a token budget maps onto steps and micro-batches (see :func:`plan_budget`)."""

    steps: int  # optimizer steps
    tokens: int  # tokens actually trained: steps * tokens_per_step
    rows_per_step: int  # global rows per optimizer step
    accum_steps: int  # micro-batches per step on each process


@dataclass
class TrainResult:
    """What a CPT run did. ``final_val_loss`` is None only when the run diverged."""

    status: Literal["completed", "stopped", "diverged"]
    reason: str  # one line: why the run ended
    steps: int  # optimizer steps taken
    tokens: int  # training tokens consumed (steps * tokens_per_step)
    budget_tokens: int  # tokens the full budget would have trained
    final_val_loss: float | None
    initial_val_loss: float  # held-out loss before the first step
    train_loss: float | None  # loss of the last step (includes the MoE aux loss when present)
    wall_s: float  # whole call, evaluation included
    tokens_per_s: float  # training throughput, evaluation time excluded
    precision: str  # resolved: "bf16" or "fp32"
    device: str
    num_processes: int
    val_losses: list[tuple[int, float]]  # (step, held-out loss) of every evaluation of the main run (eval_early too)
    schedule: str = "cosine"
    points: list[dict] = field(default_factory=list)  # one per budget point reached (see continue_pretraining)
    branch_tokens: int = 0  # tokens trained in cooldown branches, on top of ``tokens``
    precision_choice: dict = field(default_factory=dict)  # why ``precision`` (ablate.precision.Choice)
    trainable_params: int | None = None  # parameters the optimizer updated (fewer than all with trainable: new)

    def to_dict(self) -> dict:
        return asdict(self)


class StopTraining(Exception):
    """Raise from ``on_eval`` to stop training early (status "stopped")."""


def lr_at(step: int, total_steps: int, *, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) out of ``total_steps``."""
    min_lr = lr * min_lr_ratio
    # 1) linear warmup: step 0 gets lr / warmup_steps, step warmup_steps - 1 gets the peak
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    # 2) no room to decay (every step is warmup but one): hold the peak; past the end: the floor
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    if step >= total_steps - 1:
        return min_lr
    # 3) in between, cosine decay from the peak to the floor, reached at the last step
    ratio = (step - warmup_steps) / decay_steps
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return min_lr + coeff * (lr - min_lr)


def wsd_lr_at(step: int, point: BudgetPoint, *, lr: float, warmup_steps: int, min_lr_ratio: float,
              decay: str = "1-sqrt") -> float:
    """Learning rate of optimizer step ``step`` (0-based) on the way to budget point ``point`` (schedule wsd).

    Linear warmup (as in :func:`lr_at`), the peak until the point's fork, then its cooldown: step
    ``fork_step + i`` (i = 0 .. cooldown_steps - 1) decays with t = (i + 1) / cooldown_steps to
    ``min_lr + (lr - min_lr) * (1 - t)`` (linear) or ``... * (1 - sqrt(t))`` (1-sqrt, Hägele et al.
    2024), so the point's last step is at the floor ``min_lr``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step < point.fork_step:
        return lr
    t = min(1.0, (step - point.fork_step + 1) / point.cooldown_steps)
    factor = 1.0 - (t if decay == "linear" else math.sqrt(t))
    min_lr = lr * min_lr_ratio
    return min_lr + (lr - min_lr) * factor


@dataclass(frozen=True)
class BudgetPoint:
    """One budget point of a wsd run: ``steps`` optimizer steps, the last ``cooldown_steps`` decaying."""

    index: int  # 0-based position in the budget list
    tokens: int  # tokens trained by the point's end: steps * tokens_per_step
    steps: int
    cooldown_steps: int
    final: bool  # the run's last point: the main run's own cooldown, not a branch

    @property
    def fork_step(self) -> int:
        """Steps at the constant rate before this point's cooldown starts (where its branch forks)."""
        return self.steps - self.cooldown_steps


def plan_points(config: TrainConfig) -> list[BudgetPoint]:
    """The budget points of ``config`` in whole steps (one point for schedule cosine)."""
    points = config.budget_points
    out = []
    for i, b in enumerate(points):
        steps = b // config.tokens_per_step
        if steps == 0:
            raise UserError(f"the budget point {b} is smaller than one step (tokens_per_step="
                            f"{config.tokens_per_step}); raise it or lower tokens_per_step")
        if out and steps == out[-1].steps:
            raise UserError(f"the budget points {out[-1].tokens} and {b} are the same number of steps of "
                            f"{config.tokens_per_step} tokens; space them at least one step apart")
        cool = max(1, round(config.cooldown * steps)) if config.schedule == "wsd" else 0
        out.append(BudgetPoint(index=i, tokens=steps * config.tokens_per_step, steps=steps, cooldown_steps=cool,
                               final=i == len(points) - 1))
    if config.schedule == "wsd":
        warmup = warmup_steps(config, out[-1].steps)
        first = out[0]
        if warmup > first.fork_step:
            raise UserError(f"the warmup ({warmup} steps, warmup_tokens={config.warmup_tokens}) ends after the "
                            f"first budget point's cooldown starts (step {first.fork_step} of {first.steps}); "
                            "lower warmup_tokens or raise the first budget point")
    return out


def early_eval_steps(config: TrainConfig, total_steps: int) -> list[int]:
    """The extra held-out evaluations of ``eval_early``: steps 1, 2, 4, ..., 2**(eval_early - 1) up to
    ``total_steps``, less those an ``eval_every`` evaluation (or the last step's) already measures."""
    return [s for s in (2 ** i for i in range(config.eval_early))
            if s < total_steps and s % config.eval_every != 0]


def warmup_steps(config: TrainConfig, total_steps: int) -> int:
    """Warmup steps: ``warmup_tokens`` in whole steps when given, else the ``warmup`` fraction (cosine)."""
    if config.warmup_tokens is not None:
        return round(config.warmup_tokens / config.tokens_per_step)
    return int(config.warmup * total_steps)


def plan_budget(config: TrainConfig, *, seq_len: int, num_train_rows: int,
                num_processes: int = 1) -> Budget:
    """Steps and micro-batches for a token budget; a :class:`UserError` if they do not fit."""
    per_micro = config.micro_batch_size * seq_len * num_processes
    if config.tokens_per_step % per_micro:
        raise UserError(
            f"tokens_per_step={config.tokens_per_step} is not a multiple of micro_batch_size * "
            f"seq_len * processes = {config.micro_batch_size} * {seq_len} * {num_processes} = "
            f"{per_micro}; set tokens_per_step to a multiple of {per_micro}")
    steps = config.tokens // config.tokens_per_step
    if steps == 0:
        raise UserError(
            f"the budget tokens={config.tokens} is smaller than one step (tokens_per_step="
            f"{config.tokens_per_step}); raise tokens or lower tokens_per_step")
    rows_per_step = config.tokens_per_step // seq_len
    if steps * rows_per_step > num_train_rows:
        raise UserError(
            f"the budget needs {steps * rows_per_step} training rows ({steps} steps of "
            f"{rows_per_step}) but the data has {num_train_rows}; build more data or lower tokens")
    return Budget(steps=steps, tokens=steps * config.tokens_per_step, rows_per_step=rows_per_step,
                  accum_steps=config.tokens_per_step // per_micro)


def check_processes(config: TrainConfig, world: int) -> None:
    """What this config cannot do over ``world`` processes, as a one-line error. A study checks it on
    every rank before its first trial; :func:`continue_pretraining` again, for direct callers."""
    if world > 1 and config.compile == "layers":  # the compiled copy would bypass DDP's and FSDP's forward
        raise UserError(f"train.compile: layers trains in one process, this run has {world}; with a launcher "
                        "use train.compile: true")
    if config.distributed == "fsdp" and config.eval_rows % world:  # every rank runs as many forwards (collectives)
        raise UserError(f"train.distributed: fsdp splits train.eval_rows={config.eval_rows} over {world} "
                        f"processes; set train.eval_rows to a multiple of {world}")


def resolve_precision(precision: str, device: torch.device, model=None, *, micro_batch: int = 8,
                      seq_len: int = 128) -> str:
    """'auto' -> what trains ``model`` fastest on ``device`` (:func:`ablate.precision.choose`)."""
    return precisions.choose(precision, device, model, micro_batch=micro_batch, seq_len=seq_len).precision


def train_only_layers(model: torch.nn.Module, layers: Sequence[int]) -> list[torch.nn.Parameter]:
    """Freeze every parameter of ``model`` but those of decoder layers ``layers`` (``model.model.layers``),
    as LLaMA Pro trains only its inserted blocks; return the parameters it froze (to thaw them after).

    A frozen parameter gets no gradient, so AdamW never sees it: no update, no weight decay, no moments.
    """
    decoder = getattr(getattr(model, "model", None), "layers", None)
    if decoder is None or not layers or not all(0 <= j < len(decoder) for j in layers):
        raise UserError(f"trainable: new trains decoder layers {list(layers)}, which this model does not have; "
                        "set train.trainable: all")
    keep = {id(p) for j in layers for p in decoder[j].parameters()}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused kernels are the fastest AdamW on CUDA and on CPU (one pass over each tensor)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=True)


def _rows(array: np.ndarray, start: int, count: int, device: torch.device,
          order: np.ndarray | None = None) -> torch.Tensor:
    """Rows ``start .. start + count`` of ``array``, or of its permutation ``order`` when given."""
    # sorted within the micro-batch: sequential reads of a memory-mapped cache, and a micro-batch's
    # gradient is a mean over its rows, so their order inside it does not matter
    rows = array[start:start + count] if order is None else array[np.sort(order[start:start + count])]
    return torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device)


def row_order(seed: int | None, num_rows: int, available: int | None = None) -> np.ndarray | None:
    """Which pool rows the first ``num_rows`` training rows are, for ``data_order_seed``; None: in order.

    Rows are shuffled within windows of SHUFFLE_WINDOW rows of the packed pool (``PackedData.pool``:
    the train rows and the rest of their last window), each window by its own permutation, so the
    order is prefix-stable: the first r rows are the same whatever the budget (a branch at b tokens
    equals a run of b tokens). A budget that ends inside a window reads some rows of that window
    from past its own rows; ``available`` (default ``num_rows``) is how many rows the pool has.
    """
    if seed is None:
        return None
    available = num_rows if available is None else available
    out = np.empty(num_rows, dtype=np.int64)
    for start in range(0, num_rows, SHUFFLE_WINDOW):
        size = min(SHUFFLE_WINDOW, available - start)
        # a stream of its own (not seed's torch/numpy state), so the order is the same on every rank
        perm = np.random.default_rng([seed, 0x0DA7A, start // SHUFFLE_WINDOW]).permutation(size)
        count = min(SHUFFLE_WINDOW, num_rows - start)
        out[start:start + count] = start + perm[:count]
    return out


def _val_loss(model, data: PackedData, config: TrainConfig, accelerator, autocast) -> float:
    """Mean next-token loss over the first ``eval_rows`` rows of data.val (LM loss only)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    with evaluating(model):
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        mine = list(range(rank, config.eval_rows, world))  # rows of this process, strided
        for i in range(0, len(mine), config.micro_batch_size):
            idx = mine[i:i + config.micro_batch_size]
            ids = torch.from_numpy(np.asarray(data.val[idx], dtype=np.int64)).to(accelerator.device)
            with autocast():
                logits = model(input_ids=ids, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(ids[:, 1:].numel(), device=ids.device)])
        total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def continue_pretraining(model: torch.nn.Module, data: PackedData, config: TrainConfig, *,
                         on_eval: Callable[[int, int, float], bool | None] | None = None,
                         on_point: Callable[[BudgetPoint, dict], bool | None] | None = None,
                         out_dir: str | Path | None = None, progress: bool = True,
                         cpu: bool = False, new_layers: Sequence[int] | None = None) -> TrainResult:
    """Train ``model`` in place on ``data.train`` rows in order for the token budget of ``config``.

    It trains on CUDA when present (the device accelerate picks for this process), else on the
    CPU; ``cpu=True`` keeps it on the CPU on a CUDA machine too (a study's ``--device cpu``).

    ``on_eval(step, tokens_seen, val_loss)`` runs on the main process after every ``eval_every``
    evaluation and the last step's (not after the early ones of ``eval_early``, which only go to
    ``metrics.jsonl`` and ``TrainResult.val_losses``); returning True (or raising
    :class:`StopTraining`) ends the run with status "stopped". A non-finite loss or gradient norm
    ends it at once with status "diverged" (no update is applied). With ``out_dir``, writes
    ``train_config.json``, ``metrics.jsonl`` (one line per step) and ``train_result.json`` there.

    Schedule wsd: the run trains at the constant peak rate and, at each budget point's fork but the
    last, saves its state (model, AdamW moments, RNG; in memory or, with ``branch_state: disk``, in
    ``out_dir/fork.pt``), trains the point's cooldown on the next rows of the same order (a branch),
    calls ``on_point(point, info)`` with the model as it is at the point's end, and restores the
    state: the main run goes on as if the branch had never been, and the branch is, bit for bit on
    a CPU, the run with ``tokens: b, budgets: [b]``. The last point is the main run's own cooldown.
    ``on_point`` runs on every process (an evaluation may be collective); returning True stops the
    run ("stopped"). Under schedule cosine it is called once, at the end, for the one point.

    With ``trainable: new`` only the decoder layers ``new_layers`` (the plan's
    :attr:`~ablate.plan.Plan.new_layers`) train; every other parameter is frozen during the run and
    trainable again after it.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    start = time.perf_counter()
    # Accelerator picks the device and the process group; precision stays ours (torch.autocast)
    # because accelerate's mixed_precision is process-global and cannot change between trials.
    # cpu=True without CUDA: else a multi-process launch on CPUs silently runs unsynchronised.
    accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
    if config.budget_unit != "tokens":
        raise UserError("budget_unit flops: convert the budget to this model's tokens first "
                        "(TrainConfig.in_tokens(flops_per_token))")
    if isinstance(config.lr, list):
        raise UserError(f"lr={config.lr} is a grid: a study runs one lr per trial; pass one lr to train")
    if data.val.shape[0] < config.eval_rows:
        raise UserError(f"eval_rows={config.eval_rows} but data.val has {data.val.shape[0]} rows; "
                        "lower eval_rows or build more validation data")
    budget = plan_budget(config, seq_len=data.seq_len, num_train_rows=int(data.train.shape[0]),
                         num_processes=accelerator.num_processes)
    points = plan_points(config)
    choice = precisions.choose(config.precision, accelerator.device, model, micro_batch=config.micro_batch_size,
                               seq_len=data.seq_len)
    choice = distributed.share(choice)  # rank 0's: auto may time both precisions, and timings differ per rank
    precision = choice.precision
    if accelerator.mixed_precision not in ("no", precision):
        raise UserError(f"accelerate was launched with mixed_precision={accelerator.mixed_precision}"
                        f" but TrainConfig.precision resolves to {precision}; launch without "
                        "--mixed_precision (TrainConfig.precision decides)")
    set_seed(config.seed)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    fsdp = config.distributed == "fsdp"
    if fsdp and not torch.distributed.is_initialized():
        raise UserError("train.distributed: fsdp needs a process group; launch with torchrun --nproc_per_node G "
                        "-m ablate.study ... (or accelerate launch), or set train.distributed: ddp")
    check_processes(config, world)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    model.to(device)
    model.train()
    if config.trainable == "new" and not new_layers:
        raise UserError("trainable: new trains only the layers an operator added and none were given; pass "
                        "new_layers (ablate.plan.Plan.new_layers) or set train.trainable: all")
    frozen = train_only_layers(model, new_layers) if config.trainable == "new" else []
    trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if fsdp:  # sharded in place, before the optimizer sees the (now sharded) parameters
        distributed.shard(model, device, precision)
        optimizer = _optimizer(model, config)
        ddp_model = model
    else:
        optimizer = _optimizer(model, config)
        ddp_model, optimizer = accelerator.prepare(model, optimizer)
    forward = ddp_model
    if config.compile == "layers":  # one process (check_processes)
        from accelerate.utils import compile_regions

        forward = compile_regions(ddp_model)  # a copy that shares the parameters: ddp_model stays eager
    elif config.compile:
        forward = torch.compile(ddp_model)
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    warmup = warmup_steps(config, budget.steps)
    pool = data.train if config.data_order_seed is None else data.train_pool
    order = row_order(config.data_order_seed, budget.steps * budget.rows_per_step, int(pool.shape[0]))
    rows_per_rank = budget.rows_per_step // world
    main = accelerator.is_main_process
    out = Path(out_dir) if out_dir is not None and main else None
    metrics = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(config.model_dump_json(indent=2) + "\n")
        metrics = open(out / "metrics.jsonl", "w", buffering=1)  # line-buffered: readable live

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")

    def lr_of(step: int, point: BudgetPoint) -> float:  # step: 0-based
        if config.schedule == "cosine":
            return lr_at(step, budget.steps, lr=config.lr, warmup_steps=warmup, min_lr_ratio=config.min_lr_ratio)
        return wsd_lr_at(step, point, lr=config.lr, warmup_steps=warmup, min_lr_ratio=config.min_lr_ratio,
                         decay=config.decay)

    clock = {"train_s": 0.0, "steps": 0}  # every optimizer step taken, branches included

    def train_step(step: int, lr: float) -> dict | None:
        """One optimizer step (1-based ``step``) at rate ``lr``; None when the loss or gradient is not finite."""
        t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = torch.zeros(2, device=device)  # (loss, aux loss) summed over micro-batches
        first_row = (step - 1) * budget.rows_per_step + rank * rows_per_rank
        has_aux = False
        for k in range(budget.accum_steps):
            ids = _rows(pool, first_row + k * config.micro_batch_size, config.micro_batch_size, device, order)
            last = k == budget.accum_steps - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(ddp_model)
            with sync:
                with autocast():
                    # no KV cache: transformers builds one whenever config.use_cache is on (copying every
                    # layer's keys and values) and training never reads it; Trainer turns it off too
                    outputs = forward(input_ids=ids, labels=ids, use_cache=False)
                # keep the loss, drop the logits before backward: autograd does not need them (the loss
                # saved its log-softmax), and holding them through backward and the optimizer step costs
                # rows x seq_len x vocab floats of peak memory (Trainer drops them the same way)
                step_loss, aux = outputs.loss, getattr(outputs, "aux_loss", None)
                del outputs
                accelerator.backward(step_loss / budget.accum_steps)
            has_aux = aux is not None
            losses += torch.stack([step_loss.detach().float(),
                                   aux.detach().float() if aux is not None else losses[1] * 0])
        losses = accelerator.reduce(losses, reduction="mean") / budget.accum_steps
        max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        loss, aux_loss, grad_norm = losses[0].item(), losses[1].item(), float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            return None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock["train_s"] += time.perf_counter() - t0
        clock["steps"] += 1
        record = {"step": step, "tokens": step * config.tokens_per_step, "train_loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "tokens_per_s": clock["steps"] * config.tokens_per_step / clock["train_s"]}
        if has_aux:
            record.update(aux_loss=aux_loss, lm_loss=loss - aux_coef * aux_loss)
        return record

    def finish_point(point: BudgetPoint, steps_done: int, val: float | None, status: str) -> bool:
        info = {"budget_tokens": point.tokens, "steps": steps_done, "tokens": steps_done * config.tokens_per_step,
                "cooldown_steps": point.cooldown_steps, "fork_step": point.fork_step,
                "branch": not point.final, "val_loss": val, "status": status}
        done_points.append(info)
        if on_point is None or status != "completed":
            return False
        with evaluating(model):
            stop = on_point(point, info)
        return bool(stop)

    def branch(point: BudgetPoint) -> bool:
        """Train ``point``'s cooldown from the current state, hand it to on_point, restore the state."""
        saved = _save_state(model, optimizer, device, out / "fork.pt" if config.branch_state == "disk" and
                            out is not None else None)
        status, step, val = "completed", point.fork_step, None
        try:
            for step in range(point.fork_step + 1, point.steps + 1):
                record = train_step(step, lr_of(step - 1, point))
                if record is None:
                    status, step = "diverged", step - 1
                    break
                log({**record, "branch": point.tokens})
                bar.update()
            if status == "completed":
                val = _val_loss(ddp_model, data, config, accelerator, autocast)
                log({"step": step, "tokens": step * config.tokens_per_step, "val_loss": val, "branch": point.tokens})
            return finish_point(point, step, val, status)
        finally:
            _restore_state(model, optimizer, saved)
            model.train()

    initial = _val_loss(ddp_model, data, config, accelerator, autocast)
    log({"step": 0, "tokens": 0, "val_loss": initial})
    val_losses: list[tuple[int, float]] = [(0, initial)]
    early = set(early_eval_steps(config, budget.steps))
    done_points: list[dict] = []
    status, reason, step, train_loss = "completed", "", 0, None
    final = points[-1]
    forks = [p for p in points if not p.final]
    total_steps = budget.steps + sum(p.cooldown_steps for p in forks)
    bar = tqdm(total=total_steps, unit="step", disable=not (progress and main), dynamic_ncols=True)
    try:
        for step in range(1, budget.steps + 1):
            stop = False
            for point in forks:
                if point.fork_step == step - 1:
                    stop = branch(point) or stop
            if stop:
                step -= 1
                status = "stopped"
                reason = f"on_point asked to stop after budget point {done_points[-1]['budget_tokens']}"
                break
            record = train_step(step, lr_of(step - 1, final))
            if record is None:
                status = "diverged"
                reason = f"non-finite loss / grad norm at step {step}"
                step -= 1  # the update of this step was not applied; train_loss stays the last finite
                break
            train_loss = record["train_loss"]
            if step % config.eval_every == 0 or step == budget.steps:
                val = _val_loss(ddp_model, data, config, accelerator, autocast)
                record["val_loss"] = val
                val_losses.append((step, val))
                stop = _ask(on_eval, step, record["tokens"], val, accelerator)
            elif step in early:  # for the curve only: the pruner sees the eval_every evaluations alone
                val = _val_loss(ddp_model, data, config, accelerator, autocast)
                record["val_loss"] = val
                val_losses.append((step, val))
            log(record)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
            bar.update()
            if stop:
                status, reason = "stopped", f"on_eval asked to stop after step {step}"
                break
        if status == "completed":
            bar.close()
            if finish_point(final, step, val_losses[-1][1], "completed"):
                status, reason = "stopped", f"on_point asked to stop after budget point {final.tokens}"
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        accelerator.unwrap_model(ddp_model, keep_fp32_wrapper=False)
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        for p in frozen:
            p.requires_grad_(True)
    if status == "completed":
        reason = f"trained {budget.tokens} tokens in {budget.steps} steps"
        if forks:
            reason += f", plus {sum(p.cooldown_steps for p in forks) * config.tokens_per_step} tokens of " \
                      f"{len(forks)} cooldown branches"
    elif status == "diverged" and not reason:
        reason = f"non-finite loss at step {step}"
    branch_tokens = sum(p["steps"] - p["fork_step"] for p in done_points if p["branch"]) * config.tokens_per_step
    result = TrainResult(
        status=status, reason=reason, steps=step, tokens=step * config.tokens_per_step,
        budget_tokens=budget.tokens,
        final_val_loss=None if status == "diverged" else val_losses[-1][1],
        initial_val_loss=initial, train_loss=train_loss, wall_s=time.perf_counter() - start,
        tokens_per_s=clock["steps"] * config.tokens_per_step / clock["train_s"] if clock["train_s"] else 0.0,
        precision=precision, device=str(device), num_processes=world, val_losses=val_losses,
        schedule=config.schedule, points=done_points, branch_tokens=branch_tokens,
        precision_choice=choice.to_dict(), trainable_params=trainable_params)
    if out is not None:
        (out / "train_result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def _save_state(model: torch.nn.Module, optimizer, device: torch.device, path: Path | None) -> dict:
    """What a branch must give back: parameters and buffers, AdamW's state, the RNG streams.

    In memory by default (about 3x the fp32 weights: parameters and two moments); with ``path``
    a checkpoint file, for models where a second copy does not fit (it is read back and deleted).
    """
    state = {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
             "optimizer": copy.deepcopy(optimizer.state_dict()),
             "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None}
    if path is None:
        return state
    torch.save(state, path)
    return {"path": path}


def _restore_state(model: torch.nn.Module, optimizer, saved: dict) -> None:
    if "path" in saved:
        path = saved["path"]
        saved = torch.load(path, map_location="cpu", weights_only=False)
        path.unlink()
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def _ask(on_eval, step: int, tokens: int, val: float, accelerator) -> bool:
    """Run the callback on the main process and share its stop decision with every rank."""
    stop = False
    if on_eval is not None and accelerator.is_main_process:
        try:
            stop = bool(on_eval(step, tokens, val))
        except StopTraining:
            stop = True
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        flag = broadcast(torch.tensor([int(stop)], device=accelerator.device), from_process=0)
        stop = bool(flag.item())
    return stop
