"""Scale-out over several processes / GPUs: sharded inversion and DDP fine-tuning.

Launch any medkt command with ``torchrun``:

    torchrun --nproc_per_node 4 -m medkt transfer --bundle NAME --output runs/x

torchrun sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` / ``MASTER_PORT``;
`init_from_env` joins the process group (NCCL when the model is on a GPU, gloo on CPU) and
`local_device` puts each rank on its own GPU (``cuda:LOCAL_RANK``). Then

* **inversion**: the images are split into chunks of ``InversionConfig.chunk_size``; rank ``r``
  runs chunks ``r, r + W, r + 2W, ...`` (round-robin) and the images are gathered on every rank
  in chunk order. Each chunk has its own seeds (see `medkt.inversion`), so the merged result
  is bit-identical to a single-process run with the same chunk size;
* **fine-tuning**: `medkt.finetune.finetune` wraps the loss computation in
  ``DistributedDataParallel``; every global batch is split across ranks and each rank's loss is
  weighted by its share, so the averaged gradient equals the single-process one;
* **outputs**: only rank 0 writes the run folder (checkpoints of every chunk go to the shared
  staging folder, so ``--resume`` works across ranks).

Without ``WORLD_SIZE > 1`` everything here is a no-op and medkt runs in one process.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from medkt.errors import ConfigError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a torchrun launch (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes the run folder."""
        return self.rank == 0


def env_from_torchrun() -> DistEnv:
    """Rank / world size / local rank from torchrun's environment variables (defaults: 1 process)."""
    try:
        return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None


def is_initialized() -> bool:
    """A torch.distributed process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the group (1 without one)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """This process is rank 0 (always true without a group)."""
    return rank() == 0


def local_device(requested: str | torch.device | None = "auto") -> torch.device:
    """The device this process should use for ``requested`` (a ``--device`` value).

    Under torchrun (``WORLD_SIZE > 1``) ``auto`` and ``cuda`` (no index) mean this rank's GPU,
    ``cuda:LOCAL_RANK``, when CUDA is available; everything else is
    `medkt.device.resolve_device` of ``requested``.
    """
    from medkt.device import resolve_device

    text = "auto" if requested is None else str(requested).strip().lower()
    env = env_from_torchrun()
    if env.world_size > 1 and text in ("auto", "cuda") and torch.cuda.is_available():
        return resolve_device(f"cuda:{env.local_rank}")
    return resolve_device(requested)


def init_from_env(backend: str | None = None, device: str | torch.device | None = None) -> bool:
    """Join the process group described by torchrun's variables; True when running distributed.

    ``device`` is where the model runs (a ``--device`` value, resolved with `local_device`;
    None = the CPU, create_backend's default). ``backend`` defaults to NCCL when that device is a
    CUDA GPU (made this process's current device), else gloo: a CPU model on a GPU node uses gloo,
    since NCCL cannot move CPU tensors. Idempotent.
    """
    if is_initialized():
        return world_size() > 1
    env = env_from_torchrun()
    if env.world_size <= 1:
        return False
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ConfigError(f"WORLD_SIZE={env.world_size} but {var} is not set; launch with torchrun")
    dev = local_device("cpu" if device is None else device)
    use_cuda = dev.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(dev)
    # ranks wait for each other around rank 0's evaluations: allow long gaps (default 30 min is short)
    minutes = float(os.environ.get("MEDKT_DIST_TIMEOUT_MIN", 12 * 60))
    dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"), rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(minutes=minutes))
    return True


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together: every rank waits at a barrier, then destroys it.

    Destroying at different times lets gloo tear down a pair whose peer has gone, and its C++
    destructor then aborts the process ("terminate called without an active exception")."""
    if not is_initialized():
        return
    try:
        if world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (identity without a process group)."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_chunks(n_chunks: int, rank_: int, world: int) -> list[int]:
    """Chunks of one rank, round-robin: rank r gets r, r + world, r + 2 world, ..."""
    if world < 1 or not 0 <= rank_ < world:
        raise ConfigError(f"rank {rank_} is not in a world of {world} process(es)")
    return list(range(rank_, n_chunks, world))


def n_chunks(targets: Sequence[Any], chunk_size: int | None) -> int:
    """Inversion chunks of ``chunk_size`` images over all targets' ``n_images`` (one chunk when None)."""
    n = sum(int(t.n_images) for t in targets)
    c = chunk_size or n
    return (n + c - 1) // c


def local_share(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """Contiguous slice of ``n`` items for one rank (sizes differ by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


# --- what a run records about where it computes ----------------------------------------------
def runtime_record(device: str | torch.device | None = "auto", precision: str | None = "auto") -> dict[str, Any]:
    """Where and how a run computes, for ``run.log``, ``settings.json`` and ``results.json``.

    Keys: ``device`` (resolved, e.g. ``"cuda:0"``; under torchrun this rank's GPU, see
    `local_device`) and ``device_requested`` (e.g. ``"auto"``),
    ``precision`` (resolved) and ``precision_requested``, ``dtype`` of the forward passes
    (``"bfloat16"``, ``"float16"`` or ``"float32"``), ``gpu_name`` and ``gpu_memory_gib`` (None off
    CUDA), ``torch`` and ``cuda`` (the CUDA version torch was built with; None for a CPU build),
    ``world_size`` (processes sharing the work: 1 unless under torchrun).

    Raises:
        ConfigError: the device or precision is not available here (as `medkt.device.resolve_device`).
    """
    from medkt.device import autocast_dtype, resolve_precision

    dev = local_device(device)
    prec = resolve_precision(precision, dev)
    dtype = autocast_dtype(prec)
    rec: dict[str, Any] = {
        "device": str(dev), "device_requested": "auto" if device is None else str(device),
        "precision": prec, "precision_requested": "auto" if precision is None else str(precision),
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "gpu_name": None, "gpu_memory_gib": None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "world_size": world_size(),
    }
    if dev.type == "cuda":
        rec["gpu_name"] = torch.cuda.get_device_name(dev)
        rec["gpu_memory_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return rec


def describe_runtime(rec: dict[str, Any]) -> str:
    """One log line of a `runtime_record`."""
    gpu = f", GPU {rec['gpu_name']} ({rec['gpu_memory_gib']} GiB)" if rec.get("gpu_name") else ""
    return (f"device {rec['device']} (requested {rec['device_requested']}), precision {rec['precision']} "
            f"({rec['dtype']}; requested {rec['precision_requested']}){gpu}, torch {rec['torch']}, "
            f"CUDA {rec['cuda'] or 'none (CPU build)'}, world size {rec['world_size']}")


__all__ = ["DistEnv", "runtime_record", "describe_runtime", "env_from_torchrun", "local_device", "init_from_env", "is_initialized", "world_size", "rank", "is_main",
           "barrier", "broadcast_object", "shard_chunks", "n_chunks", "local_share"]
