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
from pathlib import Path
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


def invert_sharded(backend, targets, config=None, out_dir: str | Path | None = None, resume: bool = False,
                   progress: bool = True, init_images: torch.Tensor | None = None):
    """`medkt.inversion.invert` with the chunks spread over the ranks; every rank gets the
    whole result (images in the single-process order). Without a process group: plain ``invert``.

    Use ``config.chunk_size`` to make several chunks (one chunk = nothing to share): e.g. the
    number of images per concept, so each concept is one chunk.
    """
    from medkt.inversion import InversionConfig, InversionResult, invert

    cfg = config if isinstance(config, InversionConfig) else InversionConfig.from_dict(config)
    world = world_size()
    if world == 1:
        return invert(backend, targets, cfg, out_dir=out_dir, resume=resume, progress=progress,
                      init_images=init_images)
    total = n_chunks(targets, cfg.chunk_size)
    mine = shard_chunks(total, rank(), world)
    part = None
    if mine:
        part = invert(backend, targets, cfg, out_dir=out_dir, resume=resume, progress=progress and is_main(),
                      chunks=mine, init_images=init_images)
    payload = None if part is None else {
        "chunks": mine, "images": part.images.cpu(), "concepts": part.concepts, "texts": part.texts,
        "similarities": part.similarities, "steps_run": part.steps_run, "history": part.history,
        "seconds": part.seconds}
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, payload)
    # reassemble in chunk order: chunk c's images are the next block of its rank's images
    chunk_size = cfg.chunk_size or sum(int(t.n_images) for t in targets)
    by_chunk: dict[int, dict[str, Any]] = {}
    for p in parts:
        if p is None:
            continue
        offset = 0
        for j, c in enumerate(p["chunks"]):
            n_c = min(chunk_size, sum(int(t.n_images) for t in targets) - c * chunk_size)
            sl = slice(offset, offset + n_c)
            by_chunk[c] = {"images": p["images"][sl], "concepts": p["concepts"][sl], "texts": p["texts"][sl],
                           "similarities": p["similarities"][sl], "steps_run": p["steps_run"][j],
                           "history": p["history"][j]}
            offset += n_c
    if sorted(by_chunk) != list(range(total)):
        raise RuntimeError(f"sharded inversion is missing chunks: got {sorted(by_chunk)} of {total}")
    order = [by_chunk[c] for c in range(total)]
    device = backend.device
    return InversionResult(
        images=torch.cat([o["images"] for o in order]).to(device),
        concepts=[c for o in order for c in o["concepts"]],
        texts=[t for o in order for t in o["texts"]],
        similarities=[s for o in order for s in o["similarities"]],
        seconds=max(p["seconds"] for p in parts if p is not None),
        steps_run=[o["steps_run"] for o in order],
        history=[o["history"] for o in order],
    )


def local_share(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """Contiguous slice of ``n`` items for one rank (sizes differ by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


__all__ = ["DistEnv", "env_from_torchrun", "local_device", "init_from_env", "is_initialized", "world_size", "rank", "is_main",
           "barrier", "broadcast_object", "shard_chunks", "n_chunks", "invert_sharded", "local_share"]
