"""Which precision trains a model fastest on this device: ``precision: auto`` for CPT.

A rule by device alone is wrong on CPUs with native bf16 (AVX512-BF16 / AMX): bf16 matmuls run at
about 3x fp32 there (393 vs 125 GFLOP/s at 2048^3), but the default study's 64-wide models are
overhead-bound and bf16 autocast only adds casts: on such a machine a width-64 Llama trained at
17,127 tokens/s in fp32 against 11,389 in bf16 (4 layers; 10,755 vs 5,469 with 8), and a zoo
build took 360 s in bf16 against 237 s in fp32 (studies/LOG.md, issue 14). So on those CPUs
:func:`choose` times a few forward and backward passes of the model at hand in each precision and
keeps the faster, cached per model shape, micro-batch, CPU and thread count in
``ablate_home()/precision.json`` (a study times each shape once, not each trial).

Elsewhere no timing is needed: CUDA GPUs with bf16 train in bf16 (tensor cores; measured 46% MFU
compiled on an H100), and CPUs without native bf16 emulate it about 100x slower than fp32.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ablate.errors import UserError
from ablate.fsutil import ablate_home, atomic_write_json, waiting_lock

__all__ = ["Choice", "choose", "native_bf16", "cache_path"]

TIMED_STEPS = 3  # forward + backward passes timed per precision, after one untimed warm-up of each


@dataclass(frozen=True)
class Choice:
    """A resolved precision and why: ``reason`` is one line for the trial record."""

    precision: str  # "bf16" or "fp32"
    reason: str
    fp32_tokens_per_s: float | None = None
    bf16_tokens_per_s: float | None = None
    cached: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cache_path() -> Path:
    return ablate_home() / "precision.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _shape_key(model, micro_batch: int, seq_len: int) -> str:
    config = model.config
    shape = {k: getattr(config, k, None) for k in ("model_type", "hidden_size", "intermediate_size",
                                                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                    "vocab_size", "num_local_experts", "num_experts_per_tok")}
    return json.dumps({"cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "micro_batch": micro_batch, "seq_len": seq_len, **shape}, sort_keys=True)


def _time_passes(model, precision: str, ids: torch.Tensor, steps: int) -> float:
    """Seconds per forward + backward pass of ``model`` on ``ids`` in ``precision`` (no update)."""
    autocast = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    best = float("inf")
    for _ in range(steps):
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        best = min(best, time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return best


def measure(model, device: torch.device, micro_batch: int, seq_len: int) -> tuple[float, float]:
    """Tokens/s of a forward + backward pass in fp32 and in bf16 autocast (best of TIMED_STEPS after a
    warm-up each). Parameters, gradients, the RNG and train/eval mode are left as they were."""
    was_training = model.training
    state = torch.get_rng_state()
    ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    model.train()
    try:
        for precision in ("fp32", "bf16"):  # warm-up: allocations, kernel selection
            _time_passes(model, precision, ids, 1)
        fp32 = _time_passes(model, "fp32", ids, TIMED_STEPS)
        bf16 = _time_passes(model, "bf16", ids, TIMED_STEPS)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        torch.set_rng_state(state)
    tokens = micro_batch * seq_len
    return tokens / fp32, tokens / bf16


def choose(precision: str, device: torch.device, model=None, *, micro_batch: int = 8, seq_len: int = 128,
           cache: bool = True) -> Choice:
    """The precision to train ``model`` in on ``device``: ``precision`` itself unless it is "auto".

    "auto": bf16 on a CUDA GPU with bf16; fp32 on a CPU without native bf16; on a CPU with native bf16,
    the faster of the two for this model (timed, see the module docstring), fp32 when no model is given.
    """
    if precision not in ("auto", "bf16", "fp32"):
        raise UserError(f"precision must be one of auto, fp32, bf16, not {precision!r}")
    native = native_bf16(device)
    if precision == "bf16" and device.type == "cuda" and not native:
        raise UserError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16; "
                        "use precision='fp32' or 'auto'")
    if precision != "auto":
        return Choice(precision, "asked for")
    if device.type == "cuda":
        return Choice("bf16" if native else "fp32", "CUDA " + ("with" if native else "without") + " bf16")
    if not native:
        return Choice("fp32", "this CPU emulates bf16 (no AVX512-BF16/AMX): about 100x slower than fp32")
    if model is None:
        return Choice("fp32", "native bf16, but no model to time: fp32")
    key = _shape_key(model, micro_batch, seq_len)
    path = cache_path()
    known = _read(path).get(key) if cache else None
    if known is not None:
        return Choice(known["precision"], known["reason"], known["fp32_tokens_per_s"], known["bf16_tokens_per_s"],
                      cached=True)
    fp32, bf16 = measure(model, device, micro_batch, seq_len)
    pick = "bf16" if bf16 > fp32 else "fp32"
    choice = Choice(pick, f"timed on this model: fp32 {fp32:,.0f} vs bf16 {bf16:,.0f} tokens/s (forward + "
                          f"backward, micro-batch {micro_batch} x {seq_len})", fp32, bf16)
    if cache:
        with waiting_lock(path.with_name(".precision.lock")):
            table = _read(path)
            table[key] = {k: v for k, v in choice.to_dict().items() if k != "cached"}
            atomic_write_json(path, table)
    return choice


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: time again and write a good one
    return table if isinstance(table, dict) else {}
