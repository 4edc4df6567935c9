"""A study worker made of several processes: the process group, rank 0's role, FSDP2 and its checkpoint.

``torchrun --nproc_per_node G -m ablate.study ...`` (or ``accelerate launch --num_processes G -m
ablate.study ...``) starts one worker of G processes. :func:`setup` joins the process group from the
launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``): gloo for
``--device cpu``, NCCL for CUDA, one GPU per process (``cuda:LOCAL_RANK``). Rank 0 alone talks to
Optuna and writes records; it hands each trial's arm to the others with :meth:`Group.send`
(``broadcast_object_list``), and after every trial all ranks meet in :meth:`Group.together`: a rank
that died makes it raise :class:`GroupLost`, so the trial is failed without a reason of its own and its
configuration runs again, as a killed single-process worker's does.

Every rank builds the whole variant from the same deterministic base, then, with ``train.distributed:
fsdp``, :func:`shard` shards it with FSDP2 (``fully_shard`` per decoder layer, then the root): simple,
and exact for the small models this is tested on. The cost is that each rank holds the base and the
full variant until sharding (``ablate plan-memory`` counts it); building on the meta device and loading
shards would remove it and is not done yet. :func:`save_full_checkpoint` gathers a sharded model into
one Hugging Face checkpoint written by rank 0, one full copy in rank 0's host memory and none elsewhere.

Imported only by modules that already run torch.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ablate.errors import UserError

__all__ = ["Group", "GroupLost", "launched", "setup", "is_main", "rank", "world", "share", "shard",
           "save_full_checkpoint", "full_state_dict", "sharded", "plain_architecture", "backend_for"]

# Collectives wait this long for a peer (NCCL's default of 10 minutes would hide a hung rank for long;
# a CPT step of a 10B model is seconds). Gloo notices a dead peer at once (its socket closes).
TIMEOUT = timedelta(seconds=int(os.environ.get("ABLATE_DIST_TIMEOUT_S", "1800")))


class GroupLost(UserError):
    """A process of this worker died (or stopped answering): the trial is not its configuration's failure."""


def launched() -> bool:
    """Whether a launcher started this process as one rank of a group (torchrun or accelerate launch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a process that belongs to no group."""
    return rank() == 0


def backend_for(device: str) -> str:
    """The collective backend a device needs: NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _check_backend(device: str) -> None:
    have, need = dist.get_backend(), backend_for(device)
    if need not in str(have).split(":")[-1].split(","):  # "cpu:gloo,cuda:nccl" serves both
        raise UserError(f"the process group uses {have}, which cannot carry {torch.device(device).type} tensors "
                        f"(--device {device} needs {need}); use --device "
                        f"{'cuda' if have == 'nccl' else 'cpu'}, or start the group with {need}")


class Group:
    """This process as one rank of a study worker; ``device`` is the device its rank trains on."""

    def __init__(self, device: str):
        self.device = device
        self.rank, self.world = rank(), world()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def send(self, message) -> None:
        """Rank 0: hand ``message`` (any picklable object; None ends the followers) to every other rank."""
        self._collective(share, message)

    def receive(self):
        """Ranks > 0: the next message of rank 0 (blocks until it comes)."""
        return self._collective(share, None)

    def together(self, failure: str | None = None) -> list[str]:
        """Every rank ends the trial here, saying why its part failed (None: it did not).

        Returns the other ranks' failures as ``"rank R: reason"``; raises :class:`GroupLost` when a
        rank cannot answer (it died: the collective fails as soon as its connection closes).
        """
        reasons: list = [None] * self.world
        self._collective(dist.all_gather_object, reasons, failure)
        return [f"rank {r}: {why}" for r, why in enumerate(reasons) if why is not None and r != self.rank]

    def _collective(self, call, *args):
        try:
            return call(*args)
        except RuntimeError as exc:  # gloo: "Connection reset by peer" at once; NCCL: a timeout
            raise GroupLost(f"a process of this {self.world}-process worker is gone ("
                            f"{' '.join(str(exc).split())[:160]}); the trial runs again when the worker is "
                            "started again") from None


def setup(device: str) -> Group | None:
    """Join the launcher's process group (None when this process was not started as one of several ranks).

    ``device`` is the study's resolved device (``cpu``, ``cuda``); under a launcher each rank trains on
    its own GPU, ``cuda:LOCAL_RANK``, so a device with an index is refused.
    """
    if not launched():
        return None
    kind = torch.device(device).type
    if kind == "cuda":
        if torch.device(device).index is not None and int(os.environ["WORLD_SIZE"]) > 1:
            raise UserError(f"--device {device} under a launcher of several processes: each rank takes its own GPU "
                            "(cuda:LOCAL_RANK); pass --device cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"rank with LOCAL_RANK={local} but this machine shows {torch.cuda.device_count()} GPUs; "
                            "launch at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), timeout=TIMEOUT)
    _check_backend(device)
    return Group(device)


def share(value):
    """``value`` as rank 0 has it, on every rank (itself outside a group)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(model: torch.nn.Module, device: torch.device, precision: str) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 over every rank: each decoder layer, then the root.

    Master weights, gradients and AdamW's moments stay in fp32, sharded; with ``precision`` bf16 on a
    GPU each layer is gathered in bf16 for compute and its gradients reduced in fp32 (a
    MixedPrecisionPolicy). On CPU everything stays fp32. Build the optimizer after this call.

    Gradients are reduce-scattered after every micro-batch, accumulation included: skipping that
    (``set_requires_gradient_sync(False)``) would keep each rank's whole unsharded gradient between
    micro-batches, the memory sharding is there to save.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise UserError("train.distributed: fsdp needs a process group; launch with torchrun --nproc_per_node G "
                        "-m ablate.study ... (or accelerate launch), or set train.distributed: ddp")
    device = torch.device(device)
    _check_backend(str(device))
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise UserError("train.distributed: fsdp shards decoder layers at model.model.layers, which this model "
                        "does not have; set train.distributed: ddp")
    mesh = init_device_mesh(device.type, (world(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision == "bf16" and device.type == "cuda" else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model.float()  # a bf16 checkpoint: fp32 master weights, converted shard by shard
    return model


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors): gathering them is a collective."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: torch.nn.Module) -> dict | None:
    """``model``'s full state dict on rank 0's host, None on the other ranks; every rank calls it.

    A sharded model is gathered tensor by tensor (``full_state_dict=True, cpu_offload=True``: one full
    copy in rank 0's host memory, none elsewhere); a plain one (one process, or a ddp replica) is copied
    to the host by rank 0 alone.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if sharded(model):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if is_main() else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if is_main() else None


def plain_architecture(model: torch.nn.Module) -> str:
    """The class name a checkpoint of ``model`` is loaded with: FSDP2 renames it ``FSDP<Class>`` once sharded."""
    return next(c for c in type(model).__mro__
                if not c.__name__.startswith("FSDP") and hasattr(c, "config_class")).__name__


def save_full_checkpoint(model: torch.nn.Module, tokenizer, folder: str | Path) -> Path | None:
    """Gather a sharded (FSDP2) or plain ``model`` into one Hugging Face checkpoint in ``folder``.

    Every rank calls it (for a sharded model the gathering is collective, see :func:`full_state_dict`),
    and rank 0 writes ``config.json``, safetensors weights and the tokenizer. Returns the folder on
    rank 0, None elsewhere. The checkpoint loads with ``AutoModelForCausalLM``.
    """
    state = full_state_dict(model)
    if not is_main():
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    model.config.architectures = [plain_architecture(model)]  # save_pretrained wrote FSDP<Class>
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
