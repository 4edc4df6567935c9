"""Peak resident memory of the streaming exports on a checkpoint of more than 1 GB.

    python bench/export_memory.py [--workdir DIR] [--keep]

Builds a random bf16 Llama checkpoint of about 2 GB (hidden 2048, 16 layers), then
measures with ``/usr/bin/time -v`` (maximum resident set size) each of:

- ``python -m ablate.upscale SRC --m 4 --out ...`` (streaming DUS export, 24 layers),
- ``python -m ablate.moe SRC --experts 4 --top-k 2 --out ...`` (streaming MoE export),
- the naive path: ``from_pretrained`` + ``depth_upscale`` + ``save_pretrained``.

Prints a table, then one JSON line. Target: the streaming exports stay under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

NAIVE = """
import sys, torch
from transformers import AutoModelForCausalLM
from ablate.upscale import depth_upscale
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
depth_upscale(model, 4).save_pretrained(sys.argv[2])
"""


def make_checkpoint(path: Path) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=32000)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="500MB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def peak_rss(cmd: list[str]) -> tuple[float, float]:
    """(max RSS in MB, wall seconds) of a command, from GNU time."""
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"command failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(":"))))
    return rss_kb / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ablate-bench-"))
    src = work / "base"
    size = make_checkpoint(src) if not src.exists() else sum(f.stat().st_size for f in src.glob("*.safetensors"))
    py = sys.executable
    rows = {
        "ablate.upscale (stream)": [py, "-m", "ablate.upscale", str(src), "--m", "4", "--out", str(work / "dus")],
        "ablate.moe (stream)": [py, "-m", "ablate.moe", str(src), "--experts", "4", "--top-k", "2",
                                "--out", str(work / "moe")],
        "naive HF load+save": [py, "-c", NAIVE, str(src), str(work / "naive")],
    }
    results = {}
    for name, cmd in rows.items():
        for out in ("dus", "moe", "naive"):
            shutil.rmtree(work / out, ignore_errors=True)
        results[name] = peak_rss(cmd)
    print(f"source checkpoint: {size / 1e9:.2f} GB (bf16, 16 layers, hidden 2048)")
    print(f"{'command':<26}{'peak RSS (MB)':>15}{'wall (s)':>10}")
    for name, (rss, wall) in results.items():
        print(f"{name:<26}{rss:>15.0f}{wall:>10.1f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({
        "checkpoint_gb": round(size / 1e9, 3),
        "upscale_peak_rss_mb": round(results["ablate.upscale (stream)"][0]),
        "moe_peak_rss_mb": round(results["ablate.moe (stream)"][0]),
        "naive_peak_rss_mb": round(results["naive HF load+save"][0]),
    }))


if __name__ == "__main__":
    main()
