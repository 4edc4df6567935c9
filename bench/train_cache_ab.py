"""A/B: training forward with and without the KV cache transformers builds by default.

    python bench/train_cache_ab.py            # about a minute on 2 cores

A Llama's forward builds a DynamicCache whenever ``use_cache`` is on (its config's default), in
training too: every layer then copies its keys and values into the cache (``torch.cat`` onto an
empty tensor) and the backward pass routes their gradients back through that copy. Training never
reads the cache. This times AdamW steps (forward, backward, clip, step) of the same model, same
rows, with ``use_cache`` True and False in alternating order (A B B A ...), and prints tokens/s of
each and their ratio, for the throughput bench's model (12 x 512, seq 256) and two of the default
study's arms (width 64, 4 and 8 layers, seq 128, 8 rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def model(layers: int, width: int, vocab: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=width, intermediate_size=width * 3 if width < 256 else 1376,
                                        num_hidden_layers=layers, num_attention_heads=max(4, width // 64),
                                        num_key_value_heads=max(4, width // 64), vocab_size=vocab,
                                        max_position_embeddings=seq, tie_word_embeddings=False))


def tokens_per_s(net, rows: torch.Tensor, steps: int, use_cache: bool) -> float:
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=True)
    net.train()
    times = []
    for _ in range(steps + 1):  # the first step (allocations) is left out
        t0 = time.perf_counter()
        loss = net(input_ids=rows, labels=rows, use_cache=use_cache).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return rows.numel() * steps / sum(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="A/B pairs per model, in alternating order")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cases = [("bench 12x512, 8x256", dict(layers=12, width=512, vocab=2048, seq=256), (8, 256), 3),
             ("default 4x64, 8x128", dict(layers=4, width=64, vocab=512, seq=128), (8, 128), 60),
             ("default 8x64, 8x128", dict(layers=8, width=64, vocab=512, seq=128), (8, 128), 40)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 native: "
          f"{torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    out = {}
    for name, shape, (batch, seq), steps in cases:
        rows = torch.randint(0, shape["vocab"], (batch, seq), generator=torch.Generator().manual_seed(0))
        runs = {True: [], False: []}
        for r in range(args.rounds):
            for use_cache in ((True, False) if r % 2 == 0 else (False, True)):
                runs[use_cache].append(tokens_per_s(model(**shape), rows, steps, use_cache))
        on, off = statistics.median(runs[True]), statistics.median(runs[False])
        out[name] = {"use_cache_true": round(on), "use_cache_false": round(off), "ratio": round(off / on, 3),
                     "runs_true": [round(x) for x in runs[True]], "runs_false": [round(x) for x in runs[False]]}
        print(f"{name:<22} use_cache=True {on:8.0f} tok/s   False {off:8.0f} tok/s   ratio {off / on:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
