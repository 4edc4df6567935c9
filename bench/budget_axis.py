"""Wall time of one CPT run with four budget points against one run at the top budget alone.

    python bench/budget_axis.py                # about 2 minutes on 2 cores
    python bench/budget_axis.py --repeats 5 --steps 512

Issue 13's target: with budgets a factor 4 apart (B/64, B/16, B/4, B) and cooldown 0.2, the
4-point run (schedule wsd: three cooldown branches forked off the constant-rate run, each
evaluated on held-out loss, plus the main run's own cooldown) takes at most 1.1x the wall time
of the single run at B (schedule wsd, budgets [B]), on the same model and data. The token
overhead alone is cooldown * (B/4 + B/16 + B/64) = 6.6% of B; the rest is the branches' state
copies and held-out evaluations. Both arms run in this process, alternated (single, multi,
single, multi, ...) so that drift in the machine's speed hits both; the ratio of medians is
printed, with the CPU's bf16 capability and the precision used. The model is the default
study's kind: a width-64 Llama of 4 layers, 8 rows of 128 tokens per step, fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ablate.data import PackedData
from ablate.train import TrainConfig, continue_pretraining

SEQ, VOCAB, ROWS = 128, 512, 8


def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=SEQ)
    return LlamaForCausalLM(config)


def data(steps: int) -> PackedData:
    rng = np.random.default_rng(0)
    return PackedData(train=rng.integers(0, VOCAB, (steps * ROWS, SEQ), dtype=np.int32),
                      val=rng.integers(0, VOCAB, (64, SEQ), dtype=np.int32), seq_len=SEQ, source="random")


def config(budgets: list[int], steps: int) -> TrainConfig:
    step = ROWS * SEQ
    return TrainConfig(schedule="wsd", budgets=budgets, cooldown=0.2, warmup_tokens=step, tokens_per_step=step,
                       micro_batch_size=ROWS, lr=1e-3, eval_every=steps // 4, eval_rows=32, precision="fp32")


def timed(cfg: TrainConfig, rows: PackedData) -> tuple[float, int]:
    m = model()
    t0 = time.perf_counter()
    result = continue_pretraining(m, rows, cfg, progress=False)
    return time.perf_counter() - t0, result.tokens + result.branch_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=384, help="optimizer steps of the top budget B (default 384)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each arm, alternated (default 3)")
    args = parser.parse_args()
    step = ROWS * SEQ
    top = args.steps * step
    budgets = [top // 64 // step * step, top // 16 // step * step, top // 4 // step * step, top]
    rows = data(args.steps)
    single, multi = config([top], args.steps), config(budgets, args.steps)
    timed(config([4 * step], 4), rows)  # warm-up: allocator, thread pool, first-call costs
    times: dict[str, list[float]] = {"single": [], "multi": []}
    tokens = {}
    for _ in range(args.repeats):
        for name, cfg in (("single", single), ("multi", multi)):
            seconds, trained = timed(cfg, rows)
            times[name].append(seconds)
            tokens[name] = trained
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["multi"] / med["single"]
    print(f"CPU bf16 native: {bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}; precision fp32; "
          f"torch threads {torch.get_num_threads()}")
    print(f"budgets (tokens): {budgets}, cooldown 0.2, {args.repeats} runs each, alternated")
    print(f"{'run':<28}{'tokens trained':>16}{'median s':>10}{'all s':>28}")
    for name, label in (("single", "one run at B"), ("multi", "4 budget points, one run")):
        print(f"{label:<28}{tokens[name]:>16,}{med[name]:>10.2f}{'  '.join(f'{t:.2f}' for t in times[name]):>28}")
    print(f"ratio (4 points / single): {ratio:.3f}x wall, {tokens['multi'] / tokens['single']:.3f}x tokens; "
          f"target <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'}")
    print(json.dumps({"budgets": budgets, "median_s": med, "ratio": round(ratio, 4),
                      "token_ratio": round(tokens["multi"] / tokens["single"], 4),
                      "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}))


if __name__ == "__main__":
    main()
