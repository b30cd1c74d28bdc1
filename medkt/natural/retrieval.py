"""Image-text retrieval with a cross-encoder (ViLT): all-pairs ITM scores and recall@K.

Recall@K follows ViLT's evaluation (``compute_irtr_recall`` in dandelin/ViLT):

* **TR@K** (text retrieval, image -> text): for each image, rank all captions by score; the image
  counts as a hit when *any* of its captions (5 on Flickr30k) is among the top K.
* **IR@K** (image retrieval, text -> image): for each caption, rank all images; the caption counts
  when *its* image is among the top K.

A cross-encoder has no embeddings to compare, so every (image, caption) pair goes through the
model: 1,000 x 5,000 = 5M forward passes on the Flickr30k Karpathy test split.
`PairwiseITMScorer` makes that affordable and safe: each image's patch tokens are computed
once (`ViltBackend.embed_image`) and reused for all caption batches; captions are tokenised
once; finished blocks of image rows are written as atomic files, so an interrupted run resumes
where it stopped (the files carry a fingerprint of the captions, images and model so a stale
cache is refused, not silently mixed).

Scale-out: the model runs on its device (``backend.device``, images are moved there one by one,
forward passes under ``backend.autocast()``); under torchrun the blocks are spread round-robin
over the ranks (block ``b`` on rank ``b % world``), each rank writes its own block files, and the
finished rows are gathered so every rank (rank 0 included) returns the whole score matrix.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from medkt.backends.base import ImageTextMatcher
from medkt.checkpoints import settings_digest
from medkt.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def recall_at_k(scores: torch.Tensor, caption_image: Sequence[int] | torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@K in both directions, as fractions in [0, 1].

    Args:
        scores: ``(n_images, n_captions)``, higher = better match.
        caption_image: for each caption, the row index of its image.
        ks: cut-offs; a K larger than the number of candidates is clamped.
    Returns:
        ``{"tr_r1", "tr_r5", ..., "ir_r1", ...}`` plus ``"rsum"`` (sum of all, in percent points
        as in the literature: 100 * sum).
    """
    scores = torch.as_tensor(scores, dtype=torch.float64)
    if scores.dim() != 2:
        raise ValueError(f"scores must be (n_images, n_captions), got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN (unfinished pairs?)")
    n_img, n_txt = scores.shape
    cap_img = torch.as_tensor(list(caption_image) if not isinstance(caption_image, torch.Tensor) else caption_image).long()
    if cap_img.numel() != n_txt:
        raise ValueError(f"{n_txt} captions in scores but {cap_img.numel()} entries in caption_image")
    if n_txt and (cap_img.min() < 0 or cap_img.max() >= n_img):
        raise ValueError(f"caption_image holds an index outside [0, {n_img})")
    out: dict[str, float] = {}
    image_ids = torch.arange(n_img)
    for k in ks:
        kt = min(int(k), n_txt)
        top_txt = scores.topk(kt, dim=1).indices  # (n_img, kt) caption indices
        tr = (cap_img[top_txt] == image_ids[:, None]).any(dim=1).double().mean().item()
        ki = min(int(k), n_img)
        top_img = scores.topk(ki, dim=0).indices  # (ki, n_txt) image indices
        ir = (top_img == cap_img[None, :]).any(dim=0).double().mean().item()
        out[f"tr_r{k}"] = tr
        out[f"ir_r{k}"] = ir
    out["rsum"] = 100.0 * sum(v for key, v in out.items() if key != "rsum")
    return out


class PairwiseITMScorer:
    """All-pairs ITM scores ``(n_images, n_captions)`` with cached image tokens and resumable blocks.

    Args:
        backend: a backend with ``embed_image`` / ``itm_logits_from_embeds`` (ViLT).
        captions: all captions (tokenised once).
        image_loader: ``i -> (3, H, W)`` [0,1] tensor of image ``i`` (e.g. ViLT's native resize).
        n_images: number of images.
        cache_dir: where blocks ``rows_<start>_<end>.pt`` and ``scores_meta.json`` go; None keeps
            everything in memory (no resume).
        text_batch_size: captions scored per forward pass (all against one image).
        block_size: image rows per checkpoint file.
        score: ``"match_logit"`` (the ITM "match" logit; ViLT's rank head is initialised from
            that row) or ``"match_prob"`` (softmax probability of "match").
        identity: extra items for the fingerprint (e.g. backend spec and fine-tuned weights hash).
    """

    def __init__(self, backend: Any, captions: Sequence[str], image_loader: Callable[[int], torch.Tensor], n_images: int,
                 cache_dir: str | Path | None = None, text_batch_size: int = 64, block_size: int = 8,
                 score: str = "match_logit", identity: Sequence[Any] = (), image_keys: Sequence[str] | None = None,
                 progress: bool = True):
        if score not in ("match_logit", "match_prob"):
            raise ConfigError(f"score must be 'match_logit' or 'match_prob', got {score!r}")
        if not isinstance(backend, ImageTextMatcher):
            raise ConfigError(f"backend {backend.spec or backend.family!r} has no ITM head with cached image tokens")
        self.backend = backend
        self.captions = list(captions)
        self.image_loader = image_loader
        self.n_images = int(n_images)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.text_batch_size = int(text_batch_size)
        self.block_size = max(1, int(block_size))
        self.score = score
        self.progress = progress
        keys = list(image_keys) if image_keys is not None else list(range(self.n_images))
        # the one settings digest of medkt (checkpoints); ``identity`` holds e.g. the weights fingerprint
        self.fingerprint = settings_digest({"captions": self.captions, "images": keys, "score": score,
                                            "identity": list(identity)})[:16]

    # -- cache -------------------------------------------------------------------------------
    def _blocks(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.block_size, self.n_images)) for s in range(0, self.n_images, self.block_size)]

    def _block_path(self, start: int, end: int) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"rows_{start:07d}_{end:07d}.pt"

    def _check_meta(self) -> None:
        from medkt.utils import atomic_write_json

        assert self.cache_dir is not None
        meta_path = self.cache_dir / "scores_meta.json"
        meta = {"fingerprint": self.fingerprint, "n_images": self.n_images, "n_captions": len(self.captions),
                "block_size": self.block_size, "score": self.score}
        if meta_path.is_file():
            old = json.loads(meta_path.read_text())
            if old != meta:
                raise DataError(
                    f"score cache {self.cache_dir} belongs to another run (captions/images/model/settings differ: "
                    f"{old} vs {meta}); delete it or use another cache folder"
                )
        else:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(meta_path, meta)

    def done_rows(self) -> int:
        """Number of image rows already scored in the cache."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return 0
        return sum(e - s for s, e in self._blocks() if self._block_path(s, e).is_file())

    # -- scoring -----------------------------------------------------------------------------
    @torch.no_grad()
    def score_image(self, image: torch.Tensor, tokens: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """One image ``(3, H, W)`` (any device) against all caption batches -> ``(n_captions,)`` on the CPU."""
        with self.backend.autocast():
            emb, mask = self.backend.embed_image(image[None].to(self.backend.device))
            out = []
            for tok in tokens:
                logits = self.backend.itm_logits_from_embeds(emb, mask, tok).float()
                out.append(logits[:, 1] if self.score == "match_logit" else logits.softmax(-1)[:, 1])
        return torch.cat(out).float().cpu()

    def my_blocks(self, rank: int | None = None, world: int | None = None) -> list[tuple[int, int]]:
        """The blocks one rank scores: round-robin (``rank, rank + world, ...``); all of them in one process."""
        from medkt import distributed as mdist

        world = mdist.world_size() if world is None else world
        rank = mdist.rank() if rank is None else rank
        blocks = self._blocks()
        return [blocks[b] for b in mdist.shard_chunks(len(blocks), rank, world)]

    def _prepare_cache(self) -> None:
        """Rank 0 checks (or writes) the cache's fingerprint; a stale cache fails on every rank."""
        from medkt import distributed as mdist

        problem = None
        if mdist.is_main():
            try:
                self._check_meta()
            except DataError as exc:
                problem = str(exc)
        problem = mdist.broadcast_object(problem)  # also a barrier: the folder exists afterwards
        if problem:
            raise DataError(problem)

    def run(self, max_blocks: int | None = None) -> torch.Tensor:
        """Score all pairs (or ``max_blocks`` more blocks per process) -> ``(n_images, n_captions)``
        on the CPU; rows not scored yet are NaN (only when ``max_blocks`` stopped early).

        A block already in ``cache_dir`` is read, not recomputed. Under torchrun every rank must
        call this with the same arguments; each scores its share and all get the full matrix.
        """
        from medkt import distributed as mdist
        from medkt.checkpoints import load_checkpoint, save_checkpoint
        from medkt.progress import Progress

        if self.cache_dir is not None:
            self._prepare_cache()
        mine = self.my_blocks()
        was_training = self.backend.training
        self.backend.eval()
        tokens = [self.backend.tokenize(self.captions[i : i + self.text_batch_size])
                  for i in range(0, len(self.captions), self.text_batch_size)]
        done: dict[int, torch.Tensor] = {}  # block start -> rows (CPU)
        bar = Progress(sum(e - s for s, e in mine), "ITM pairs (images)", unit="img",
                       enabled=self.progress and mdist.is_main())
        computed = 0
        try:
            for start, end in mine:
                path = self._block_path(start, end) if self.cache_dir is not None else None
                if path is not None and path.is_file():
                    done[start] = load_checkpoint(path)  # a damaged block file is named, not half-read
                    bar.skip(end - start)  # cached: not part of this run's rate
                    continue
                if max_blocks is not None and computed >= max_blocks:
                    continue
                rows = torch.stack([self.score_image(self.image_loader(i), tokens) for i in range(start, end)])
                done[start] = rows
                if path is not None:
                    save_checkpoint(rows, path)  # written as soon as it is finished: resumable
                computed += 1
                bar.update(end - start)
        finally:
            bar.close()
            self.backend.train(was_training)
        if mdist.world_size() > 1:  # every rank's finished blocks, to every rank
            import torch.distributed as dist

            parts: list[Any] = [None] * mdist.world_size()
            dist.all_gather_object(parts, done)
            done = {k: v for part in parts for k, v in part.items()}
        scores = torch.full((self.n_images, len(self.captions)), float("nan"))
        for start, rows in done.items():
            scores[start : start + len(rows)] = rows
        return scores


def retrieval_table(before: dict[str, float], after: dict[str, float] | None = None, ks: Sequence[int] = (1, 5, 10)) -> str:
    """Markdown table of TR@K / IR@K in percent (before, after, change)."""
    cols = [f"TR@{k}" for k in ks] + [f"IR@{k}" for k in ks]
    keys = [f"tr_r{k}" for k in ks] + [f"ir_r{k}" for k in ks]
    from medkt.utils import markdown_table

    rows = [["before", *(f"{100 * before[k]:.1f}" for k in keys)]]
    if after is not None:
        rows.append(["after", *(f"{100 * after[k]:.1f}" for k in keys)])
        rows.append(["change", *(f"{100 * (after[k] - before[k]):+.1f}" for k in keys)])
    return "\n".join(markdown_table(["model", *cols], rows, "l" + "r" * len(cols))) + "\n"


__all__ = ["recall_at_k", "PairwiseITMScorer", "retrieval_table"]
