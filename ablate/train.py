"""Continued pretraining (CPT) of a causal LM on a fixed token budget.

One job: take a model and a :class:`~ablate.data.PackedData`, train it for exactly
``TrainConfig.tokens // tokens_per_step`` optimizer steps (AdamW, linear warmup then
cosine decay, gradient clipping and accumulation), measure held-out loss along the way
and report it to a callback that may stop the run (the study's Optuna pruner).

The same function runs on CPU, on one GPU, and under ``accelerate launch`` (DDP): every
rank reads a disjoint slice of each step's rows, so the global tokens per step stay
``tokens_per_step`` whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydantic
import torch
from pydantic import Field

from ablate.data import PackedData
from ablate.errors import UserError
from ablate.torchutil import evaluating

__all__ = [
    "Budget",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "continue_pretraining",
    "lr_at",
    "plan_budget",
    "resolve_precision",
    "row_order",
]

Finite = dict(allow_inf_nan=False)  # NaN / inf are rejected with the field's name in the message


class TrainConfig(pydantic.BaseModel, extra="forbid"):
    """Settings of one CPT run. ``tokens`` is the budget, the same for every arm of a study."""

    tokens: int = Field(gt=0, description="CPT budget in training tokens; trained tokens are "
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
    compile: bool = Field(False, description="torch.compile the model before training (faster "
                          "steps after a one-off compile of tens of seconds; off by default so "
                          "short runs and tests do not pay it).")

    @pydantic.model_validator(mode="before")
    @classmethod
    def _tokens_from_budgets(cls, data):
        """``budgets`` alone gives ``tokens``: the last budget point is the whole run."""
        if isinstance(data, dict) and data.get("tokens") is None and isinstance(data.get("budgets"), list) \
                and data["budgets"] and all(isinstance(b, int) for b in data["budgets"]):
            data = {**data, "tokens": max(data["budgets"])}
        return data

    @pydantic.field_validator("lr")
    @classmethod
    def _lrs(cls, lr):
        values = lr if isinstance(lr, list) else [lr]
        if not values:
            raise ValueError("the lr grid is empty; give one lr or a list of them")
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"every lr must be a positive finite number, got {lr}")
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
    val_losses: list[tuple[int, float]]  # (step, held-out loss) for every evaluation

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


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the device has native bf16 matmuls, else 'fp32'."""
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:  # CPUs without AVX512-BF16/AMX emulate bf16 and run it far slower than fp32
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if precision == "auto":
        return "bf16" if native else "fp32"
    if precision == "bf16" and device.type == "cuda" and not native:
        raise UserError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16; "
                        "use precision='fp32' or 'auto'")
    return precision


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


def row_order(seed: int | None, num_rows: int) -> np.ndarray | None:
    """The permutation of the first ``num_rows`` training rows for ``data_order_seed``, or None."""
    if seed is None:
        return None
    # a stream of its own (not seed's torch/numpy state), so the order is the same on every rank
    return np.random.default_rng([seed, 0x0DA7A]).permutation(num_rows)


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
                logits = model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                reduction="sum")
            total += torch.stack([loss.double(), torch.tensor(ids[:, 1:].numel(), device=ids.device)])
        total = accelerator.reduce(total, reduction="sum")
    return float(total[0] / total[1])


def continue_pretraining(model: torch.nn.Module, data: PackedData, config: TrainConfig, *,
                         on_eval: Callable[[int, int, float], bool | None] | None = None,
                         out_dir: str | Path | None = None, progress: bool = True,
                         cpu: bool = False) -> TrainResult:
    """Train ``model`` in place on ``data.train`` rows in order for the token budget of ``config``.

    It trains on CUDA when present (the device accelerate picks for this process), else on the
    CPU; ``cpu=True`` keeps it on the CPU on a CUDA machine too (a study's ``--device cpu``).

    ``on_eval(step, tokens_seen, val_loss)`` runs on the main process after every evaluation;
    returning True (or raising :class:`StopTraining`) ends the run with status "stopped".
    A non-finite loss or gradient norm ends it at once with status "diverged" (no update is
    applied). With ``out_dir``, writes ``train_config.json``, ``metrics.jsonl`` (one line per
    step) and ``train_result.json`` there.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    start = time.perf_counter()
    # Accelerator picks the device and the process group; precision stays ours (torch.autocast)
    # because accelerate's mixed_precision is process-global and cannot change between trials.
    # cpu=True without CUDA: else a multi-process launch on CPUs silently runs unsynchronised.
    accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available())
    if data.val.shape[0] < config.eval_rows:
        raise UserError(f"eval_rows={config.eval_rows} but data.val has {data.val.shape[0]} rows; "
                        "lower eval_rows or build more validation data")
    budget = plan_budget(config, seq_len=data.seq_len, num_train_rows=int(data.train.shape[0]),
                         num_processes=accelerator.num_processes)
    precision = resolve_precision(config.precision, accelerator.device)
    if accelerator.mixed_precision not in ("no", precision):
        raise UserError(f"accelerate was launched with mixed_precision={accelerator.mixed_precision}"
                        f" but TrainConfig.precision resolves to {precision}; launch without "
                        "--mixed_precision (TrainConfig.precision decides)")
    set_seed(config.seed)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    model.to(device)
    model.train()
    optimizer = _optimizer(model, config)
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    forward = torch.compile(ddp_model) if config.compile else ddp_model
    aux_coef = getattr(model.config, "router_aux_loss_coef", 0.0)
    warmup_steps = int(config.warmup * budget.steps)
    order = row_order(config.data_order_seed, budget.steps * budget.rows_per_step)
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

    initial = _val_loss(ddp_model, data, config, accelerator, autocast)
    log({"step": 0, "tokens": 0, "val_loss": initial})
    val_losses: list[tuple[int, float]] = [(0, initial)]
    status, reason, step, train_loss = "completed", "", 0, None
    train_s = 0.0
    bar = tqdm(total=budget.steps, unit="step", disable=not (progress and main), dynamic_ncols=True)
    try:
        for step in range(1, budget.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step - 1, budget.steps, lr=config.lr, warmup_steps=warmup_steps,
                       min_lr_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = torch.zeros(2, device=device)  # (loss, aux loss) summed over micro-batches
            first_row = (step - 1) * budget.rows_per_step + rank * rows_per_rank
            for k in range(budget.accum_steps):
                ids = _rows(data.train, first_row + k * config.micro_batch_size,
                            config.micro_batch_size, device, order)
                last = k == budget.accum_steps - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(ddp_model)
                with sync:
                    with autocast():
                        outputs = forward(input_ids=ids, labels=ids)
                    accelerator.backward(outputs.loss / budget.accum_steps)
                aux = getattr(outputs, "aux_loss", None)
                has_aux = aux is not None
                losses += torch.stack([outputs.loss.detach().float(),
                                       aux.detach().float() if aux is not None else losses[1] * 0])
            losses = accelerator.reduce(losses, reduction="mean") / budget.accum_steps
            max_norm = config.grad_clip if config.grad_clip > 0 else float("inf")
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
            loss, aux_loss, grad_norm = losses[0].item(), losses[1].item(), float(grad_norm)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                status = "diverged"
                reason = f"non-finite loss {loss} / grad norm {grad_norm} at step {step}"
                step -= 1  # the update of this step was not applied; train_loss stays the last finite
                break
            train_loss = loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_s += time.perf_counter() - t0
            tokens = step * config.tokens_per_step
            record = {"step": step, "tokens": tokens, "train_loss": train_loss, "lr": lr,
                      "grad_norm": grad_norm, "tokens_per_s": tokens / train_s}
            if has_aux:
                record.update(aux_loss=aux_loss, lm_loss=train_loss - aux_coef * aux_loss)
            stop = False
            if step % config.eval_every == 0 or step == budget.steps:
                val = _val_loss(ddp_model, data, config, accelerator, autocast)
                record["val_loss"] = val
                val_losses.append((step, val))
                stop = _ask(on_eval, step, tokens, val, accelerator)
            log(record)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens / train_s:,.0f}")
            bar.update()
            if stop:
                status, reason = "stopped", f"on_eval asked to stop after step {step}"
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        accelerator.unwrap_model(ddp_model, keep_fp32_wrapper=False)
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    if status == "completed":
        reason = f"trained {budget.tokens} tokens in {budget.steps} steps"
    result = TrainResult(
        status=status, reason=reason, steps=step, tokens=step * config.tokens_per_step,
        budget_tokens=budget.tokens,
        final_val_loss=None if status == "diverged" else val_losses[-1][1],
        initial_val_loss=initial, train_loss=train_loss, wall_s=time.perf_counter() - start,
        tokens_per_s=step * config.tokens_per_step / train_s if train_s else 0.0,
        precision=precision, device=str(device), num_processes=world, val_losses=val_losses)
    if out is not None:
        (out / "train_result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


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
