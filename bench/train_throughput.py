"""CPU training throughput: ablate's continue_pretraining vs a default transformers.Trainer.

    python bench/train_throughput.py                 # about 5 minutes on 2 cores (2 runs per arm)
    python bench/train_throughput.py --compile       # ablate arm with torch.compile (slow here:
                                                     # ~110 s to compile, no steady-state gain)

Trains the same random Llama (12 layers, hidden 512, vocab 2048, seq_len 256, 2,048 tokens
per step) for a fixed number of steps three ways: (a) ``ablate.train.continue_pretraining``,
(b) ``transformers.Trainer`` with what a new user writes for CPU (default TrainingArguments,
same batch, no precision flag), (c) the matmul ceiling of this CPU, measured for bf16 and fp32
(2048^3, or 512^3 for a dtype the CPU only emulates; the ceiling is the faster of the two,
since CPUs without AVX512-BF16/AMX run bf16 far slower than fp32). Tokens/s are steady
state: the first step (allocations, compilation) is timed separately and left out. Prints a
table, then one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SEQ, VOCAB = 256, 2048


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=12,
                       num_attention_heads=8, num_key_value_heads=8, vocab_size=VOCAB,
                       max_position_embeddings=SEQ, tie_word_embeddings=False)


def fresh_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(model_config())


def train_rows(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (n, SEQ), dtype=np.int32)


def matmul_gflops(dtype: torch.dtype, n: int = 2048, seconds: float = 4.0) -> tuple[float, int]:
    """Best-of GFLOP/s of n^3 matmuls, and the n used. A 512^3 probe comes first: a dtype the
    CPU only emulates (bf16 without AVX512-BF16/AMX: well under 10 GFLOP/s) is reported at
    512 rather than spending minutes on one 2048^3 product."""
    def best_of(size: int, budget: float) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b
        best, deadline = 0.0, time.perf_counter() + budget
        while True:
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
            if time.perf_counter() > deadline:
                return best

    probe = best_of(512, 0.5)
    return (probe, 512) if probe < 10 else (best_of(n, seconds), n)


def steady(step_times: list[float], tokens_per_step: int) -> float:
    """Tokens/s over all steps but the first."""
    return tokens_per_step * (len(step_times) - 1) / sum(step_times[1:])


def run_ablate(steps: int, tokens_per_step: int, micro: int, compile: bool) -> dict:
    from ablate.data import PackedData
    from ablate.train import TrainConfig, continue_pretraining

    rows = steps * tokens_per_step // SEQ
    data = PackedData(train=train_rows(rows), val=train_rows(micro), seq_len=SEQ, source="random")
    config = TrainConfig(tokens=steps * tokens_per_step, micro_batch_size=micro,
                         tokens_per_step=tokens_per_step, eval_every=10**6, eval_early=0, eval_rows=micro,
                         compile=compile)
    with tempfile.TemporaryDirectory() as tmp:
        result = continue_pretraining(fresh_model(), data, config, out_dir=tmp, progress=False)
        records = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["tokens"] / r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    times = [b - a for a, b in itertools.pairwise([0.0, *elapsed])]
    return {"tokens_per_s": steady(times, tokens_per_step), "first_step_s": times[0],
            "precision": result.precision, "loss": result.train_loss}


def run_hf_trainer(steps: int, tokens_per_step: int, micro: int) -> dict:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    rows = train_rows(steps * tokens_per_step // SEQ)
    dataset = [{"input_ids": r.astype(np.int64), "labels": r.astype(np.int64)} for r in rows]
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, per_device_train_batch_size=micro,
                                 gradient_accumulation_steps=tokens_per_step // (micro * SEQ),
                                 max_steps=steps, report_to="none", save_strategy="no")
        trainer = Trainer(model=fresh_model(), args=args, train_dataset=dataset,
                          callbacks=[Stamp()])
        out = trainer.train()
    times = [b - a for a, b in itertools.pairwise(stamps)]
    return {"tokens_per_s": steady(times, tokens_per_step), "first_step_s": times[0],
            "precision": "fp32", "loss": out.training_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per arm "
                        "(the first is left out of tokens/s)")
    parser.add_argument("--tokens-per-step", type=int, default=2048,
                        help="2048 = one micro-batch of 8 rows; keeps the run under 5 minutes")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="ablate arm (HF: 8)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the ablate arm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs per arm, in alternating order (median reported)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="skip the untimed 2-step run of each arm that warms the process up first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    params = sum(p.numel() for p in fresh_model().parameters())
    load_before = os.getloadavg()[0]
    measured = {"bf16": matmul_gflops(torch.bfloat16), "fp32": matmul_gflops(torch.float32)}
    ceilings = {dtype: gflops for dtype, (gflops, _) in measured.items()}
    ceiling_dtype = max(ceilings, key=ceilings.get)
    # one short untimed run of each arm first: the first training in a fresh process pays for
    # growing the heap (its second step ran 8.3 s against 4.7 s warm, measured here), and without
    # this warm-up that cost fell on whichever arm ran first, always ablate in round 0
    if args.warmup:
        run_ablate(2, args.tokens_per_step, args.micro_batch_size, args.compile)
        run_hf_trainer(2, args.tokens_per_step, 8)
    # the arms alternate (A B, then B A, ...) and each reports its median run: on a shared or
    # thermally drifting machine a fixed order favours whichever arm runs first or last
    runs: dict[str, list[dict]] = {"ablate": [], "hf": []}
    for r in range(args.rounds):
        for arm in (("ablate", "hf") if r % 2 == 0 else ("hf", "ablate")):
            runs[arm].append(run_ablate(args.steps, args.tokens_per_step, args.micro_batch_size, args.compile)
                             if arm == "ablate" else run_hf_trainer(args.steps, args.tokens_per_step, 8))
    ours, hf = (sorted(runs[a], key=lambda x: x["tokens_per_s"])[(len(runs[a]) - 1) // 2] for a in ("ablate", "hf"))

    print(f"Llama 12x512, {params / 1e6:.1f}M params, seq {SEQ}, {args.tokens_per_step} tokens/step,"
          f" {args.steps} steps, {torch.get_num_threads()} threads, {args.rounds} alternating runs per arm"
          f"{', after a warm-up run of each' if args.warmup else ''} "
          f"(median; ablate {[round(x['tokens_per_s']) for x in runs['ablate']]}, "
          f"Trainer {[round(x['tokens_per_s']) for x in runs['hf']]} tokens/s); bf16 native: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    print(f"{'arm':<34}{'tokens/s':>10}{'GFLOP/s (6N)':>14}{'first step s':>14}")
    for name, arm in ((f"ablate ({ours['precision']}"
                       f"{', compiled' if args.compile else ''}, micro {args.micro_batch_size})", ours),
                      ("transformers.Trainer (defaults)", hf)):
        print(f"{name:<34}{arm['tokens_per_s']:>10.0f}{6 * params * arm['tokens_per_s'] / 1e9:>14.1f}"
              f"{arm['first_step_s']:>14.1f}")
    for dtype, (gflops, n) in measured.items():
        print(f"{f'matmul ceiling {dtype} {n}^3':<34}{'':>10}{gflops:>14.1f}")
    load_after = os.getloadavg()[0]
    print(f"1-minute load average {load_before:.1f} before, {load_after:.1f} after "
          f"({os.cpu_count()} cores): above {os.cpu_count()} means others shared the CPU")
    ceiling = ceilings[ceiling_dtype]
    print(json.dumps({
        "ablate_tokens_per_s": round(ours["tokens_per_s"], 1),
        "hf_trainer_tokens_per_s": round(hf["tokens_per_s"], 1),
        "ratio": round(ours["tokens_per_s"] / hf["tokens_per_s"], 3),
        "ceiling_gflops": round(ceiling, 1), "ceiling_dtype": ceiling_dtype,
        "bf16_gflops": round(ceilings["bf16"], 1), "fp32_gflops": round(ceilings["fp32"], 1),
        "ceiling_fraction": round(6 * params * ours["tokens_per_s"] / (ceiling * 1e9), 3),
        "ablate_precision": ours["precision"], "compile": args.compile, "params": params,
        "load_avg": [round(load_before, 2), round(load_after, 2)],
        "runs": {a: [round(x["tokens_per_s"], 1) for x in runs[a]] for a in runs},
        "bf16_native": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "warmup": args.warmup,
    }))


if __name__ == "__main__":
    main()
