"""Probe: the learning curve of a zoo-shaped base pretrained far past the zoo's budget (issue 15).

One wsd run (constant lr, a 1-sqrt cooldown branch at each budget point) gives the base at several
pretraining budgets: each point's branch is, bit for bit on a CPU, a cosine-free run that stops at
that budget (``ablate.train``). At each point it prints one JSON line (held-out loss on the zoo's
held-out rows, accuracy per level k1..k4 on the study's 200 items per level, tokens per parameter)
and saves the branch's checkpoint to ``OUT/<name>@<tokens>``, an ordinary Hugging Face folder
a study can name as its base, with a ``zoo.json`` naming the wsd spec it is a build of (so
``python -m ablate.zoo ship NAME --from OUT/<name>@<tokens>`` ships it when that spec is NAME's).

    python studies/probes/pretrain_curve.py OUT --layers 4 --budgets 1M 2M 4M 8M 16M [--family llama]

fp32, one thread (the zoo's setting). Measured curves are in studies/LOG.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def tokens(text: str) -> int:
    scale = {"k": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
    return int(float(text.rstrip("kM")) * scale)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--family", default="llama", choices=["llama", "mistral"])
    parser.add_argument("--budgets", nargs="+", default=["1M", "2M", "4M", "8M", "16M"])
    parser.add_argument("--lr", type=float, default=6e-3)
    parser.add_argument("--cooldown", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-tokens", type=int, default=102_400)
    parser.add_argument("--name", default=None, help="the zoo name the checkpoints are written for")
    parser.add_argument("--description", default="probe")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from ablate import train, zoo
    from ablate.data import load_packed
    from ablate.synthetic import chance_level

    torch.set_num_threads(1)
    budgets = [tokens(b) for b in args.budgets]
    extra = {"num_kv_heads": 2, "sliding_window": 64} if args.family == "mistral" else {"num_kv_heads": 4}
    spec = zoo.ZooSpec(name=args.name or f"{args.family}-{args.layers}l-s{args.seed}", family=args.family,
                       description=args.description, num_layers=args.layers, hidden_size=64, intermediate_size=192,
                       num_heads=4, train_tokens=budgets[-1], lr=args.lr, seed=args.seed, schedule="wsd",
                       warmup_tokens=args.warmup_tokens, cooldown=args.cooldown, precision="fp32", **extra)
    tokenizer = zoo.zoo_tokenizer()
    data = load_packed("synthetic", tokenizer, progress=False, **zoo.data_args(spec))
    torch.manual_seed(spec.seed)
    config = zoo.model_config(spec, len(tokenizer))
    config.eos_token_id = config.pad_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    # the zoo's own recipe of the longest budget, forked at every budget point (bit for bit the recipe
    # of a spec with train_tokens = that point: ablate.zoo.recipe_of)
    recipe = zoo.recipe_of(spec, data.val.shape[0]).model_copy(update={"budgets": budgets})
    curve = []
    out = Path(args.out)
    start = time.perf_counter()

    def point(p, info) -> bool:
        model.eval()
        probe = zoo._probe(model, tokenizer)
        folder = out / f"{spec.name}@{p.tokens}"
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        line = {"name": spec.name, "tokens": p.tokens, "tokens_per_param": round(p.tokens / params, 1),
                "val_loss": info["val_loss"], **probe, "params": params, "wall_s": round(time.perf_counter() - start)}
        curve.append(line)
        at = spec.model_copy(update={"train_tokens": p.tokens})
        (folder / "zoo.json").write_text(json.dumps({
            "zoo_version": zoo.ZOO_VERSION, "spec": at.model_dump(), "parameters": params, "tokens": p.tokens,
            "final_val_loss": info["val_loss"], "synth_acc": probe, "chance": chance_level(), "precision": "fp32",
            "wall_s": line["wall_s"], "torch_threads": 1, "curve": curve}, indent=1) + "\n")
        print(json.dumps(line), flush=True)
        model.train()
        return False

    train.continue_pretraining(model, data, recipe, on_point=point, out_dir=out / f"{spec.name}-run", progress=False,
                               cpu=True)


if __name__ == "__main__":
    main()
