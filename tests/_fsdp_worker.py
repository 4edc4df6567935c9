"""Train a tiny Llama with ``continue_pretraining`` and save it as a full checkpoint; run under torchrun or alone.

    python -m torch.distributed.run --nproc_per_node 2 tests/_fsdp_worker.py OUT fsdp
    python tests/_fsdp_worker.py OUT ddp

On a CUDA machine the same script trains on the GPUs (NCCL), as bench/gpu_all.sh runs it.

For tests/test_distributed.py: each run (a cosine run, then a wsd run with a cooldown branch) writes
``OUT/<run>/metrics.jsonl`` (rank 0), ``OUT/<run>/ckpt`` (:func:`ablate.distributed.save_full_checkpoint`)
and ``OUT/<run>/logits.pt`` (the trained model's logits on the held-out rows, rank 0).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_model  # noqa: E402
from test_train import random_data, small_config  # noqa: E402

from ablate import distributed  # noqa: E402
from ablate.torchutil import evaluating  # noqa: E402
from ablate.train import continue_pretraining  # noqa: E402

RUNS = {
    "cosine": {},
    # a branch at 2 steps forks off the main run and is restored: the fork state is the sharded state
    "wsd": dict(schedule="wsd", budgets=[2 * 16 * 32, 4 * 16 * 32], warmup_tokens=16 * 32, eval_every=1),
}


def main(out: Path, mode: str) -> None:
    torch.set_num_threads(1)
    if mode == "fsdp":  # the launcher's process group (gloo on CPU, NCCL on GPUs), also for one process
        distributed.setup("cuda" if torch.cuda.is_available() else "cpu")
    data = random_data()
    for name, overrides in RUNS.items():
        model = tiny_model(num_layers=2, tie_word_embeddings=False)
        config = small_config(distributed=mode, **overrides)
        folder = out / name
        result = continue_pretraining(model, data, config, out_dir=folder, progress=False)
        assert result.status == "completed" and result.num_processes == int(os.environ.get("WORLD_SIZE", 1)), result
        distributed.save_full_checkpoint(model, None, folder / "ckpt")
        device = next(model.parameters()).device  # the GPU of this rank where there is one (bench/gpu_all.sh)
        with evaluating(model):  # every rank: the forward pass of a sharded model is collective
            logits = model(input_ids=torch.from_numpy(data.val[:4].astype("int64")).to(device)).logits
        if distributed.is_main():
            torch.save(logits.cpu(), folder / "logits.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
