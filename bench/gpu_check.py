"""GPU check of the CPT path: a ~1B Llama DUS variant trained for 50 bf16 steps, with its MFU.

    python bench/gpu_check.py            # one GPU, under 5 minutes, no network
    python bench/gpu_check.py --tiny     # the same code on CPU at a toy size (tests run this)

Builds a random 12-layer Llama base (hidden 2048, GQA 16/8 heads, vocab 32000) on the device,
up-scales it with ``ablate.upscale.depth_upscale(m=2)`` to 20 layers (~1.07B parameters),
trains it with ``ablate.train.continue_pretraining`` on synthetic learnable rows, and prints
steady-state tokens/s and model FLOPs utilisation against a bf16 matmul ceiling measured in
the same process. The last line is one JSON object. Imports only torch, transformers,
accelerate and ablate.{train,upscale,data} (ablate.train also needs pydantic and numpy).

On CUDA the model is compiled (``TrainConfig.compile``) unless ``--no-compile``. Measured on one
H100 80GB HBM3 (torch 2.11, transformers 5.17, 2026-11-27, bench/gpu_all.sh): eager 42.4k
tokens/s, MFU 34.0% (6N) / 39.3% with attention, 40.5 GiB peak; compiled 57.7k tokens/s, MFU
46.4% / 53.6%, 33.6 GiB, 70 s wall with the compilation. The ceiling was 804 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ablate.data import PackedData
from ablate.train import TrainConfig, continue_pretraining, resolve_precision
from ablate.upscale import depth_upscale

SIZES = {
    # ~1.07B after DUS: hidden 2048 and MLP 5632 as in TinyLlama, base 12 layers, m=2 -> 20
    "full": dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000, base_layers=12, m=2, seq_len=2048,
                 micro_batch_size=4, steps=50, ceiling_n=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, base_layers=4, m=1, seq_len=64,
                 micro_batch_size=4, steps=6, ceiling_n=512),
}


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 3.0) -> float:
    """Best-of FLOP/s of n x n x n matmuls in ``dtype`` on ``device`` (the MFU denominator)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def counting_rows(n: int, seq_len: int, vocab: int, rng: np.random.Generator) -> np.ndarray:
    """Rows counting up from a random start by a random stride of 1-3 (loss should fall fast)."""
    start, stride = rng.integers(0, vocab, (n, 1)), rng.integers(1, 4, (n, 1))
    return ((start + stride * np.arange(seq_len)) % vocab).astype(np.int32)


def steady_tokens_per_s(metrics: Path, skip: int) -> float:
    """Tokens/s between step ``skip`` and the last step (compile and warm-up excluded)."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r]
    first, last = rows[min(skip, len(rows) - 2)], rows[-1]
    seconds = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    return (last["tokens"] - first["tokens"]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy size on CPU (for tests)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 50, tiny 6)")
    parser.add_argument("--micro-batch-size", type=int, help="rows per micro-batch")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on CUDA yes, on CPU no)")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    steps = args.steps or size["steps"]
    micro = args.micro_batch_size or size["micro_batch_size"]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("no CUDA device: run with --tiny for the CPU smoke version")
    compile_model = device.type == "cuda" if args.compile is None else args.compile
    precision = resolve_precision("auto", device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    ceiling = matmul_ceiling(device, dtype, size["ceiling_n"], seconds=1.0 if args.tiny else 3.0)
    config = LlamaConfig(
        hidden_size=size["hidden_size"], intermediate_size=size["intermediate_size"],
        num_attention_heads=size["num_attention_heads"],
        num_key_value_heads=size["num_key_value_heads"], vocab_size=size["vocab_size"],
        num_hidden_layers=size["base_layers"], max_position_embeddings=size["seq_len"],
        tie_word_embeddings=False)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with device:
        base = LlamaForCausalLM(config)
    model = depth_upscale(base, size["m"])
    del base
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    layers, seq = model.config.num_hidden_layers, size["seq_len"]

    rng = np.random.default_rng(0)
    tokens_per_step = micro * seq * 2  # two micro-batches: gradient accumulation is exercised
    eval_rows = 2 * micro
    data = PackedData(train=counting_rows(steps * 2 * micro, seq, size["vocab_size"], rng),
                      val=counting_rows(eval_rows, seq, size["vocab_size"], rng),
                      seq_len=seq, source="counting rows")
    train = TrainConfig(tokens=steps * tokens_per_step, micro_batch_size=micro,
                        tokens_per_step=tokens_per_step, lr=3e-4, warmup=0.1, eval_every=steps,
                        eval_rows=eval_rows, precision=precision, compile=compile_model)
    with tempfile.TemporaryDirectory() as tmp:
        result = continue_pretraining(model, data, train, out_dir=tmp, progress=False)
        tokens_per_s = steady_tokens_per_s(Path(tmp) / "metrics.jsonl", skip=min(5, steps // 2))
    # model FLOPs per token: 6N for the matmuls with weights, plus attention scores and
    # values (12 * layers * hidden * seq, PaLM appendix B; causal masking not discounted)
    flops_6n = 6 * params
    flops_attn = flops_6n + 12 * layers * size["hidden_size"] * seq
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "compiled": compile_model, "params": params, "layers": layers, "seq_len": seq,
        "tokens_per_step": tokens_per_step, "steps": result.steps, "status": result.status,
        "initial_val_loss": round(result.initial_val_loss, 4),
        "final_val_loss": result.final_val_loss and round(result.final_val_loss, 4),
        "tokens_per_s": round(tokens_per_s, 1), "ceiling_tflops": round(ceiling / 1e12, 2),
        "mfu_6n": round(flops_6n * tokens_per_s / ceiling, 4),
        "mfu_with_attention": round(flops_attn * tokens_per_s / ceiling, 4),
        "build_s": round(build_s, 1), "wall_s": round(result.wall_s, 1),
        "max_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        if device.type == "cuda" else None,
    }
    print(f"{summary['device']}: {params / 1e9:.3f}B params, {layers} layers, {precision}, "
          f"{result.steps} steps ({result.status}), val loss {summary['initial_val_loss']} -> "
          f"{summary['final_val_loss']}")
    print(f"{tokens_per_s:,.0f} tokens/s, ceiling {ceiling / 1e12:.1f} TFLOP/s, "
          f"MFU {summary['mfu_6n']:.1%} (6N), {summary['mfu_with_attention']:.1%} (with attention)")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
