"""Sharded inversion and DDP fine-tuning with 2 gloo processes on CPU (torch.multiprocessing)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from medkt.distributed import local_share, shard_chunks

TARGETS = [("moongate", "a round stone archway in a garden wall", 3),
           ("gyroscope", "a spinning disc held in nested metal rings", 2),
           ("lantern", "a paper lamp glowing orange on a string", 2)]
INV = {"steps": 4, "lr": 0.1, "chunk_size": 2, "seed": 5, "views": 2}
FT = {"lr": 1e-3, "batch_size": 3, "epochs": 1, "seed": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _targets():
    from medkt.inversion import InversionTarget

    return [InversionTarget(c, t, n) for c, t, n in TARGETS]


def _backend():
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend("clip:medkt-tiny-ViT@random")


def _single_process() -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
    from medkt.finetune import finetune
    from medkt.inversion import invert

    b = _backend()
    res = invert(b, _targets(), INV, progress=False)
    hist = finetune(b, res.images, res.concepts, {c: t for c, t, _ in TARGETS}, ["a photo of a dog."], FT,
                    texts_of_images=res.texts, progress=False, distributed=False)
    return res.images, {k: v.detach().clone() for k, v in b.visual_state_dict().items()}, hist["loss"]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)

    from medkt import distributed as mdist
    from medkt.finetune import finetune
    from medkt.inversion import invert_sharded

    assert mdist.init_from_env()
    try:
        b = _backend()
        res = invert_sharded(b, _targets(), INV, progress=False)
        hist = finetune(b, res.images, res.concepts, {c: t for c, t, _ in TARGETS}, ["a photo of a dog."], FT,
                        texts_of_images=res.texts, progress=False)
        torch.save({"images": res.images, "concepts": res.concepts, "steps_run": res.steps_run,
                    "visual": {k: v.detach().clone() for k, v in b.visual_state_dict().items()},
                    "loss": hist["loss"]}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        mdist.shutdown()


def test_round_robin_shards_and_shares():
    assert shard_chunks(7, 0, 2) == [0, 2, 4, 6] and shard_chunks(7, 1, 2) == [1, 3, 5]
    assert shard_chunks(1, 1, 2) == []
    shares = [local_share(5, r, 2) for r in range(2)]
    assert [(s.start, s.stop) for s in shares] == [(0, 3), (3, 5)]


def test_two_gloo_ranks_match_single_process(tmp_path):
    single_images, single_visual, single_loss = _single_process()
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    fresh = _backend().visual_state_dict()
    update = torch.cat([(single_visual[k] - v).flatten() for k, v in fresh.items()]).norm()
    assert update > 1e-3  # fine-tuning did move the weights, so the comparison below is not vacuous
    for r in ranks:
        # 4 chunks of (2, 2, 2, 1) images, 2 per rank, merged in order: bit-identical images
        assert torch.equal(r["images"], single_images)
        assert r["concepts"] == ["moongate"] * 3 + ["gyroscope"] * 2 + ["lantern"] * 2
        assert r["steps_run"] == [INV["steps"]] * 4
        # DDP: the same losses and the same weight update as single-process fine-tuning, up to float
        # summation order (Adam turns the ~0 gradients of the attention key bias into +-lr noise,
        # so compare the whole update rather than element by element)
        assert r["loss"] == pytest.approx(single_loss, rel=1e-4, abs=1e-6)
        diff = torch.cat([(r["visual"][k] - v).flatten() for k, v in single_visual.items()]).norm()
        assert diff < 1e-2 * update, (float(diff), float(update))
    for k in single_visual:  # the ranks stay in sync exactly
        assert torch.equal(ranks[0]["visual"][k], ranks[1]["visual"][k])


@pytest.mark.slow
def test_torchrun_bundle_writes_one_run_folder_identical_to_single_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m medkt transfer`` (gloo on CPU) == the single-process run."""
    import subprocess
    import sys

    inv = '{"steps":20,"lr":0.1,"checkpoint_every":10,"chunk_size":6}'
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = ["transfer", "--bundle", "quickstart_tiny", "--set", f"inversion={inv}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), "-m", "medkt"]
    subprocess.run(torchrun + common + ["--output", str(tmp_path / "dist")], check=True, env=env, timeout=600)
    subprocess.run([sys.executable, "-m", "medkt"] + common + ["--output", str(tmp_path / "single")], check=True,
                   env=env, timeout=600)
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    assert not (tmp_path / "dist.partial").exists()
    single_pngs = sorted(p.name for p in (single_dir / "inversion" / "images").glob("*.png"))
    assert single_pngs and single_pngs == sorted(p.name for p in (dist_dir / "inversion" / "images").glob("*.png"))
    for name in single_pngs:
        assert (dist_dir / "inversion" / "images" / name).read_bytes() == (single_dir / "inversion" / "images" / name).read_bytes()
    assert (dist_dir / "inversion" / "manifest.csv").read_text() == (single_dir / "inversion" / "manifest.csv").read_text()
    assert (dist_dir / "finetuned.safetensors").is_file() and (dist_dir / "report.md").is_file()
