"""Recall@K as ViLT defines it (hand-checked), and resumable all-pairs ITM scoring."""
from __future__ import annotations

import pytest
import torch

from medkt.natural.retrieval import PairwiseITMScorer, recall_at_k, retrieval_table

# 3 images x 6 captions, captions 2k and 2k+1 belong to image k
SCORES = torch.tensor([
    [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],   # img0: best caption c0 (own)                 -> TR hit at K=1
    [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],   # img1: c0, c1 (img0's), then c2 (own)        -> hit from K=3
    [0.1, 0.2, 0.3, 0.9, 0.4, 0.5],   # img2: c3 (img1's), then c5 (own)            -> hit from K=2
])
CAPTION_IMAGE = [0, 0, 1, 1, 2, 2]


def test_recall_hand_checked():
    r = recall_at_k(SCORES, CAPTION_IMAGE, ks=(1, 2, 3))
    # TR@K: an image counts if any of its captions is in its top K
    assert r["tr_r1"] == pytest.approx(1 / 3)
    assert r["tr_r2"] == pytest.approx(2 / 3)
    assert r["tr_r3"] == pytest.approx(1.0)
    # IR@K: a caption counts if its image is in its top K.
    # columns: c0 [.9,.7,.1] own img0 rank1; c1 [.1,.6,.2] own img0 rank3; c2 [.8,.5,.3] own img1 rank2;
    #          c3 [.2,.1,.9] own img1 rank3; c4 [.3,.2,.4] own img2 rank1; c5 [.4,.3,.5] own img2 rank1
    assert r["ir_r1"] == pytest.approx(3 / 6)
    assert r["ir_r2"] == pytest.approx(4 / 6)
    assert r["ir_r3"] == pytest.approx(1.0)
    assert r["rsum"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 + 0.5 + 4 / 6 + 1))
    table = retrieval_table(r, r, ks=(1, 2, 3))
    assert "| before | 33.3 | 66.7 | 100.0 | 50.0 | 66.7 | 100.0 |" in table


def test_recall_matches_vilt_reference_formula():
    """Same numbers as ViLT's compute_irtr_recall expression (iids/tiids with topk) on random scores."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 35, generator=g)
    tiids = torch.arange(7).repeat_interleave(5)
    iids = torch.arange(7)
    r = recall_at_k(scores, tiids, ks=(1, 5, 10))
    for k in (1, 5, 10):
        top = scores.topk(k, dim=1).indices
        tr = (iids.unsqueeze(1) == tiids[top]).float().max(dim=1)[0].mean().item()
        topi = scores.topk(min(k, 7), dim=0).indices
        ir = (tiids.unsqueeze(0) == iids[topi]).float().max(dim=0)[0].mean().item()
        assert r[f"tr_r{k}"] == pytest.approx(tr) and r[f"ir_r{k}"] == pytest.approx(ir)


def test_recall_rejects_bad_input():
    with pytest.raises(ValueError, match="caption_image"):
        recall_at_k(SCORES, [0, 1, 2])
    bad = SCORES.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(bad, CAPTION_IMAGE)


@pytest.fixture(scope="module")
def vilt():
    from medkt.backends import create_backend

    return create_backend("vilt:tiny@random")


def test_pairwise_scorer_brute_force_and_resume(vilt, tmp_path):
    from medkt.errors import DataError

    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64 + 16 * (i % 2), generator=g) for i in range(5)]  # mixed aspect ratios
    captions = ["a dog on the grass", "a red car", "two people sitting", "a cat", "a stone wall", "a field"]
    loader = lambda i: images[i]  # noqa: E731
    with torch.no_grad():
        brute = torch.stack([
            torch.stack([vilt.itm_logits(images[i][None], vilt.tokenize([c]))[0, 1] for c in captions])
            for i in range(5)])
    cache = tmp_path / "scores"
    first = PairwiseITMScorer(vilt, captions, loader, 5, cache_dir=cache, text_batch_size=4, block_size=2,
                              progress=False).run(max_blocks=1)
    assert torch.isnan(first[2:]).all() and not torch.isnan(first[:2]).any()
    calls = []
    counting = lambda i: calls.append(i) or images[i]  # noqa: E731
    scorer = PairwiseITMScorer(vilt, captions, counting, 5, cache_dir=cache, text_batch_size=4, block_size=2,
                               progress=False)
    assert scorer.done_rows() == 2
    full = scorer.run()
    assert calls == [2, 3, 4]  # rows 0-1 came from the checkpoint file
    torch.testing.assert_close(full, brute, rtol=1e-4, atol=1e-5)
    probs = PairwiseITMScorer(vilt, captions, loader, 5, score="match_prob", progress=False).run()
    assert ((probs > 0) & (probs < 1)).all()
    with pytest.raises(DataError, match="another run"):
        PairwiseITMScorer(vilt, captions[:-1], loader, 5, cache_dir=cache, block_size=2, progress=False).run()


# -- sharded across torchrun ranks -----------------------------------------------------------------
_CAPTIONS = ["a dog on the grass", "a red car", "two people sitting", "a cat", "a stone wall"]


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.rand(3, 64, 64, generator=g) for _ in range(5)]


def _retrieval_worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    import os

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)

    from medkt import distributed as mdist
    from medkt.backends import create_backend

    assert mdist.init_from_env(device="cpu")
    try:
        images, calls = _images(), []
        scorer = PairwiseITMScorer(create_backend("vilt:tiny@random"), _CAPTIONS,
                                   lambda i: calls.append(i) or images[i], 5, cache_dir=cache, text_batch_size=3,
                                   block_size=2, progress=False)
        scores = scorer.run()
        torch.save({"scores": scores, "calls": calls}, f"{out}/rank{rank}.pt")
    finally:
        mdist.shutdown()


def test_blocks_are_sharded_across_ranks_and_gathered(tmp_path):
    """2 gloo ranks: rank r scores blocks r, r+2, ... into the shared cache; every rank returns the whole matrix,
    equal to one process's; a rerun reads every block from disk."""
    import socket

    import torch.multiprocessing as mp

    from medkt.backends import create_backend

    images = _images()
    single = PairwiseITMScorer(create_backend("vilt:tiny@random"), _CAPTIONS, lambda i: images[i], 5,
                               text_batch_size=3, block_size=2, progress=False)
    assert single.my_blocks(0, 2) == [(0, 2), (4, 5)] and single.my_blocks(1, 2) == [(2, 4)]
    ref = single.run()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "scores"
    mp.start_processes(_retrieval_worker, args=(2, port, str(cache), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["calls"] == [0, 1, 4] and ranks[1]["calls"] == [2, 3]  # each image scored once, by its rank
    for r in ranks:
        torch.testing.assert_close(r["scores"], ref, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in cache.glob("rows_*.pt")) == ["rows_0000000_0000002.pt", "rows_0000002_0000004.pt",
                                                                "rows_0000004_0000005.pt"]
    calls = []
    again = PairwiseITMScorer(create_backend("vilt:tiny@random"), _CAPTIONS, lambda i: calls.append(i) or images[i], 5,
                              cache_dir=cache, text_batch_size=3, block_size=2, progress=False).run()
    assert calls == [] and torch.equal(again, ranks[0]["scores"])  # resumed from the rank files
