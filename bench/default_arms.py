"""CPT throughput of the default study's arms: today's loop against the ways to make tiny models faster.

    python bench/default_arms.py                       # about 6 minutes on 2 quiet cores
    python bench/default_arms.py --layers 4 8 12 --no-compile --rounds 3   # medians, about 6 minutes

The default study trains width-64 Llamas of 4 to 12 layers on 8 rows of 128 tokens per step. Such
models are bound by per-operation overhead, not by matmul FLOPs, so they run far below the CPU's
fp32 ceiling. For each depth this trains a fresh model for ``--steps`` optimizer steps with
``ablate.train.continue_pretraining`` in fp32 and prints steady-state tokens/s (the first
``--warmup`` steps left out) and the model FLOP/s (6 x parameters x tokens/s, plus attention) as a
fraction of the fp32 matmul ceiling measured in the same run, for these variants:

- ``today``: the study's loop as it runs now (torch's default threads: 2 here);
- ``1 thread``: one OpenMP thread;
- ``compiled``: ``train.compile: true`` (torch.compile; its one-off compile time is printed apart);
- ``2 procs x 1 thread``: two trainings side by side, one thread each, as ``--jobs 2`` runs two
  trials: the sum of their tokens/s;
- ``2 procs, layers compiled``: the same with ``train.compile: layers`` (each decoder layer compiled
  on its own, one graph for every depth; the compile, ~3 s from torch's on-disk cache and ~20 s
  without it, falls in the ``--warmup`` steps left out).

Ratios are to ``today`` of the same depth, measured in one run; with ``--rounds R`` each variant runs R
times in rotating order and reports its median.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_throughput import matmul_gflops  # noqa: E402  (same folder: the shared ceiling probe)

SEQ, ROWS, VOCAB = 128, 8, 463  # the zoo tokenizer's vocabulary


def model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                        max_position_embeddings=SEQ))


def train(layers: int, steps: int, warmup: int, compile: bool | str, threads: int | None) -> dict:
    """Train ``steps`` steps; steady tokens/s from metrics.jsonl's per-step clock, after ``warmup`` steps."""
    from ablate.data import PackedData
    from ablate.train import TrainConfig, continue_pretraining

    if threads is not None:
        torch.set_num_threads(threads)
    rng = np.random.default_rng(0)
    data = PackedData(train=rng.integers(0, VOCAB, (steps * ROWS, SEQ), dtype=np.int32),
                      val=rng.integers(0, VOCAB, (ROWS, SEQ), dtype=np.int32), seq_len=SEQ, source="random")
    config = TrainConfig(tokens=steps * ROWS * SEQ, tokens_per_step=ROWS * SEQ, micro_batch_size=ROWS, lr=1e-3,
                         eval_every=10**6, eval_rows=ROWS, precision="fp32", compile=compile)
    m = model(layers)
    params = sum(p.numel() for p in m.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        continue_pretraining(m, data, config, out_dir=tmp, progress=False)
        records = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    clock = [r["tokens"] / r["tokens_per_s"] for r in records if "tokens_per_s" in r]  # cumulative train s
    steady = (steps - warmup) * ROWS * SEQ / (clock[-1] - clock[warmup - 1])
    return {"tokens_per_s": steady, "first_steps_s": clock[warmup - 1], "params": params}


def _worker(args, queue) -> None:
    queue.put(train(*args))


def side_by_side(layers: int, steps: int, warmup: int, compile: bool | str = False) -> dict:
    """Two one-thread trainings at once in two processes: their summed steady tokens/s."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=((layers, steps, warmup, compile, 1), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return {"tokens_per_s": sum(r["tokens_per_s"] for r in results), "first_steps_s": max(r["first_steps_s"]
            for r in results), "params": results[0]["params"]}


def flops_per_token(params: int, layers: int) -> int:
    return 6 * params + 6 * layers * SEQ * 64  # as ablate.params.training_flops_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 12])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each variant, in rotating order (median)")
    args = parser.parse_args()
    fp32, size = matmul_gflops(torch.float32)
    print(f"CPU bf16 native: {bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())}; fp32 matmul ceiling "
          f"{fp32:.1f} GFLOP/s ({size}^3); torch threads {torch.get_num_threads()}; fp32 training")
    rows = []
    for layers in args.layers:
        # None: two processes side by side (the tuple's compile mode), else (compile, threads) in this one
        variants = {"today": (False, None), "1 thread": (False, 1), "2 procs x 1 thread": (None, False),
                    "2 procs, layers compiled": (None, "layers")}
        if not args.no_compile:
            variants["compiled"] = (True, None)
        # the variants in a rotating order over --rounds, each reported by its median: this machine's
        # speed drifts by +-15% between runs, more than some of the differences measured
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        names = list(variants)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                how = variants[name]
                threads = torch.get_num_threads()
                t0 = time.perf_counter()
                result = side_by_side(layers, args.steps, args.warmup, how[1]) if how[0] is None else \
                    train(layers, args.steps, args.warmup, *how)
                torch.set_num_threads(threads)
                runs[name].append({**result, "wall_s": time.perf_counter() - t0})
        base = None
        for name in names:
            r = sorted(runs[name], key=lambda x: x["tokens_per_s"])[(len(runs[name]) - 1) // 2]
            base = base or r["tokens_per_s"]
            frac = flops_per_token(r["params"], layers) * r["tokens_per_s"] / (fp32 * 1e9)
            rows.append({"layers": layers, "variant": name, "tokens_per_s": round(r["tokens_per_s"]),
                         "vs_today": round(r["tokens_per_s"] / base, 3), "ceiling_fraction": round(frac, 4),
                         "first_steps_s": round(r["first_steps_s"], 1), "wall_s": round(r["wall_s"], 1),
                         "runs": [round(x["tokens_per_s"]) for x in runs[name]]})
            print(f"{layers:>3} layers  {name:<26}{r['tokens_per_s']:>9,.0f} tok/s  {r['tokens_per_s'] / base:5.2f}x "
                  f"today  {frac:6.1%} of fp32 ceiling  first {args.warmup} steps {r['first_steps_s']:6.1f} s  "
                  f"runs {[round(x['tokens_per_s']) for x in runs[name]]}", flush=True)
    print(json.dumps({"fp32_gflops": round(fp32, 1), "rows": rows}))


if __name__ == "__main__":
    main()
