"""CoCa backend (family ``coca``): open_clip's ``CoCa`` with captioning and working generation.

* ``coca:coca_ViT-B-32@laion2b_s13b_b90k`` / ``@mscoco_finetuned_laion2b_s13b_b90k`` - an
  open_clip pretrained tag, resolved with open_clip's own registry and looked up **only in the
  local Hugging Face cache** (`medkt.weights.open_clip_tag_checkpoint`); same for
  ``coca_ViT-L-14``.
* ``coca:coca_ViT-B-32@/path/open_clip_pytorch_model.bin`` - a local checkpoint file or folder.
* ``coca:tiny@random`` - a 1-layer random CoCa (``medkt/configs/open_clip/coca_tiny.json``,
  registered with ``open_clip.add_model_config``) with the real BPE tokenizer, for tests.

Generation: open_clip 3.3.0's ``CoCa.generate`` asserts on transformers 4.57 (its fallback
import ``transformers.generation.BeamSearchScorer`` does not exist there; the class lives in
``transformers.generation.beam_search``, is deprecated, and is gone in transformers 5). This
module therefore re-implements both decoding modes in plain torch, step for step as open_clip
runs them with transformers' ``BeamSearchScorer`` (see `beam_search`): the same candidate
selection, finished-hypothesis pool, stopping rule and length normalisation, so captions match
what open_clip produced on older transformers (a test checks it against the scorer itself).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medkt.backends.base import AnyResolution, Backend, Captioner, FeatureBlocks, ImageTextEmbedder
from medkt.backends.vit_fastpath import install_fast_paths
from medkt.errors import ConfigError, unknown_name

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "open_clip"
SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0
CHECKPOINT_NAMES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors")
HOW_TO_GET = (
    "Download the open_clip CoCa checkpoint on a machine with internet, e.g. "
    "`hf download laion/CoCa-ViT-B-32-laion2B-s13B-b90k open_clip_pytorch_model.bin`, "
    "and copy the HF cache (or pass the .bin file path after '@')"
)


def register_tiny_configs() -> list[str]:
    """Register ``medkt/configs/open_clip/coca_tiny*.json`` with open_clip; return their names."""
    import open_clip

    names = []
    for path in sorted(CONFIG_DIR.glob("coca_tiny*.json")):
        if path.stem not in open_clip.list_models():
            open_clip.add_model_config(path)
        names.append(path.stem)
    return names


# ---------------------------------------------------------------------------------------------
# decoding (own implementation; see module docstring for why)
# ---------------------------------------------------------------------------------------------
StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``step(row_index, tokens) -> next-token logits``: rows of the (expanded) batch and their tokens
so far ``(R, T)`` -> logits ``(R, V)`` for position ``T``."""


def _process_logits(
    tokens: torch.Tensor, logits: torch.Tensor, eos_id: int, min_len: int, repetition_penalty: float
) -> torch.Tensor:
    """Minimum length (ban EOS while ``len < min_len``) and CTRL repetition penalty, as the
    transformers processors open_clip uses (``MinLengthLogitsProcessor``,
    ``RepetitionPenaltyLogitsProcessor``)."""
    logits = logits.clone()
    if repetition_penalty != 1.0:
        seen = torch.gather(logits, 1, tokens)
        seen = torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty)
        logits.scatter_(1, tokens, seen)
    if tokens.shape[1] < min_len:
        logits[:, eos_id] = -float("inf")
    return logits


class _Hypotheses:
    """Finished hypotheses of one sequence: keeps the ``size`` best by length-normalised score."""

    def __init__(self, size: int, length_penalty: float):
        self.size, self.length_penalty = size, length_penalty
        self.items: list[tuple[float, torch.Tensor]] = []
        self.worst = 1e9

    def add(self, tokens: torch.Tensor, score_sum: float, length: int) -> None:
        score = score_sum / (length**self.length_penalty)
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, tokens))
            if len(self.items) > self.size:
                order = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[order[0][1]]
                self.worst = order[1][0]
            else:
                self.worst = min(score, self.worst)

    def is_done(self, best_sum: float, cur_len: int) -> bool:
        # same heuristic as transformers with early_stopping=False
        if len(self.items) < self.size:
            return False
        return self.worst >= best_sum / (cur_len**self.length_penalty)

    def best(self) -> torch.Tensor:
        # sorted() is stable and the last of equal scores wins, as in transformers' finalize
        return sorted(self.items, key=lambda it: it[0])[-1][1]


@torch.no_grad()
def beam_search(
    step: StepFn,
    batch_size: int,
    *,
    num_beams: int = 6,
    num_beam_groups: int = 3,
    seq_len: int = 30,
    min_seq_len: int = 5,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    scores: str = "logits",
    sot_id: int = SOT_ID,
    eos_id: int = EOT_ID,
    pad_id: int = PAD_ID,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Beam search as open_clip's ``CoCa._generate_beamsearch`` runs it -> ``(B, L <= seq_len)``.

    open_clip splits ``num_beams`` into ``num_beam_groups`` groups but applies no diversity
    penalty, so every group follows the same search; the result equals a single search of width
    ``num_beams // num_beam_groups`` (2 with the defaults 6/3), which is what is run here.

    Args:
        step: see `StepFn`; rows are ``batch_index * width + beam``.
        scores: ``"logits"`` sums the decoder's raw logits per step (what open_clip does - it
            never applies log-softmax in beam search); ``"log_probs"`` sums log-probabilities
            (textbook beam search).
    Returns:
        token ids starting with SOT; EOS appended when it fits; rows padded with ``pad_id``.
    """
    if num_beams % num_beam_groups:
        raise ConfigError(f"num_beams={num_beams} must be divisible by num_beam_groups={num_beam_groups}")
    width = num_beams // num_beam_groups
    if width < 1:
        raise ConfigError("num_beams // num_beam_groups must be >= 1")
    if scores not in ("logits", "log_probs"):
        raise ConfigError(f"scores must be 'logits' or 'log_probs', got {scores!r}")
    if seq_len <= min_seq_len:
        raise ConfigError(f"seq_len={seq_len} must be larger than min_seq_len={min_seq_len}")
    rows = batch_size * width
    tokens = torch.full((rows, 1), sot_id, dtype=torch.long, device=device)
    beam_scores = torch.full((batch_size, width), -1e9, device=device)
    beam_scores[:, 0] = 0.0
    beam_scores = beam_scores.view(-1)
    hyps = [_Hypotheses(width, length_penalty) for _ in range(batch_size)]
    done = [False] * batch_size
    row_index = torch.arange(rows, device=device)
    while True:
        logits = step(row_index, tokens).float()
        if scores == "log_probs":
            logits = F.log_softmax(logits, dim=-1)
        vocab = logits.shape[-1]
        processed = _process_logits(tokens, logits, eos_id, min_seq_len, repetition_penalty)
        cand = (processed + beam_scores[:, None]).view(batch_size, width * vocab)
        cand_scores, cand_ids = torch.topk(cand, 2 * width, dim=1, largest=True, sorted=True)
        cand_beams, cand_tokens = cand_ids // vocab, cand_ids % vocab
        cur_len = tokens.shape[1] + 1
        next_scores = torch.zeros(batch_size, width, device=device)
        next_tokens = torch.zeros(batch_size, width, dtype=torch.long, device=device)
        next_rows = torch.zeros(batch_size, width, dtype=torch.long, device=device)
        for b in range(batch_size):
            if done[b]:
                next_tokens[b] = pad_id  # finished sequences keep running on padding
                continue
            k = 0
            for rank in range(2 * width):
                tok, sc, beam = int(cand_tokens[b, rank]), float(cand_scores[b, rank]), int(cand_beams[b, rank])
                row = b * width + beam
                if tok == eos_id:
                    if rank < width:  # an EOS outside the top `width` does not finish a hypothesis
                        hyps[b].add(tokens[row].clone(), sc, cur_len)
                else:
                    next_scores[b, k], next_tokens[b, k], next_rows[b, k] = sc, tok, row
                    k += 1
                if k == width:
                    break
            done[b] = done[b] or hyps[b].is_done(float(cand_scores[b].max()), cur_len)
        beam_scores = next_scores.view(-1)
        tokens = torch.cat([tokens[next_rows.view(-1)], next_tokens.view(-1, 1)], dim=1)
        if all(done) or tokens.shape[1] >= seq_len:
            break
    for b in range(batch_size):
        if not done[b]:
            for j in range(width):
                row = b * width + j
                hyps[b].add(tokens[row].clone(), float(beam_scores[row]), tokens.shape[1])
    best = [h.best() for h in hyps]
    lengths = [len(t) for t in best]
    out_len = min(max(lengths) + 1, seq_len)
    out = torch.full((batch_size, out_len), pad_id, dtype=torch.long, device=device)
    for b, t in enumerate(best):
        out[b, : len(t)] = t
        if len(t) < out_len:
            out[b, len(t)] = eos_id
    return out


def _top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    k = max(1, min(int(k), logits.shape[-1]))
    kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
    return logits.masked_fill(logits < kth, -float("inf"))


def _top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``."""
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - p)
    remove_sorted[..., -1] = False  # always keep the most likely token
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, -float("inf"))


@torch.no_grad()
def sample(
    step: StepFn,
    batch_size: int,
    *,
    method: str = "top_k",
    top_k: int = 1,
    top_p: float = 0.1,
    temperature: float = 1.0,
    seq_len: int = 30,
    min_seq_len: int = 5,
    repetition_penalty: float = 1.0,
    sot_id: int = SOT_ID,
    eos_id: int = EOT_ID,
    pad_id: int = PAD_ID,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Top-k / top-p sampling as open_clip's ``generate`` -> ``(B, L <= seq_len)`` ids.

    The filter is applied before the temperature (open_clip's order); the last position is
    forced to EOS; finished rows continue with ``pad_id``. ``top_k=1`` is greedy decoding.
    """
    if method not in ("top_k", "top_p"):
        raise ConfigError(f"sampling method must be 'top_k' or 'top_p', got {method!r}")
    out = torch.full((batch_size, 1), sot_id, dtype=torch.long, device=device)
    rows = torch.arange(batch_size, device=device)
    while True:
        finished = (out[:, -1] == eos_id) | (out[:, -1] == pad_id)
        if finished.all():
            break
        live = ~finished
        logits = step(rows[live], out[live]).float()
        logits = _process_logits(out[live], logits, eos_id, min_seq_len, repetition_penalty)
        logits = _top_k_filter(logits, top_k) if method == "top_k" else _top_p_filter(logits, top_p)
        probs = F.softmax(logits / temperature, dim=-1)
        nxt = torch.full((batch_size, 1), pad_id, dtype=torch.long, device=device)
        if out.shape[1] + 1 == seq_len:
            nxt[live] = eos_id
        else:
            nxt[live] = torch.multinomial(probs, 1, generator=generator)
        out = torch.cat([out, nxt], dim=1)
        if out.shape[1] >= seq_len:
            break
    return out


# ---------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------
class CocaBackend(Backend, ImageTextEmbedder, AnyResolution, Captioner, FeatureBlocks):
    """open_clip CoCa: contrastive towers + autoregressive caption decoder."""

    family = "coca"
    image_channels = 3
    model_channels = 3

    def __init__(self, model: nn.Module, tokenizer, image_size: int, mean, std):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pad_id = int(getattr(model, "pad_id", PAD_ID))
        install_fast_paths(self, model)

    # -- protocol -------------------------------------------------------------------------------
    def accepts_any_size(self) -> bool:
        """The CoCa ViT with medkt's position-embedding fast path takes any input size."""
        return bool(self.fast_paths["embeds"])

    def feature_modules(self) -> list[nn.Module]:
        """The CoCa ViT's blocks (`medkt.backends.open_clip_backend.open_clip_blocks`)."""
        from medkt.backends.open_clip_backend import open_clip_blocks

        return open_clip_blocks(self.model.visual, self.spec or "coca")

    @property
    def _device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts)).to(self._device)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values, normalize=False)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=False)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp()

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        """The vision tower (``finetune.train="visual+decoder"`` adds `decoder_parameters`)."""
        yield from self.model.visual.parameters()

    def load_image(self, image: Any) -> torch.Tensor:
        """open_clip's eval preprocessing of this model (its ``preprocess_cfg``: short side
        resized, centre crop) -> ``(3, S, S)`` in [0, 1]; see `medkt.data.images.open_clip_pixels`."""
        from medkt.data.images import open_clip_pixels

        return open_clip_pixels(image, self.model.visual.preprocess_cfg)

    def text_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.text.parameters()

    def token_embedding(self) -> nn.Embedding:
        return self.model.text.token_embedding

    def decoder_parameters(self) -> Iterator[nn.Parameter]:
        """The multimodal text decoder (trained too in the paper's Tab.9 dagger rows)."""
        return self.model.text_decoder.parameters()

    # -- captioning ---------------------------------------------------------------------------
    def image_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[0,1] pixels -> (normalised image latent ``(B, D)``, image tokens for the decoder)."""
        return self.model._encode_image(self.normalize(x))

    def caption_logits(
        self, x: torch.Tensor | None, tokens: torch.Tensor, image_embs: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced decoder logits ``(B, T-1, V)`` and their labels ``tokens[:, 1:]``.

        The decoder reads the unimodal text tower's token embeddings of ``tokens`` and
        cross-attends to the image tokens, exactly like ``CoCa.forward`` in open_clip 3.3.0
        (which shifts the labels itself; later open_clip versions moved this).
        """
        if image_embs is None:
            _, image_embs = self.image_tokens(x)
        _, token_embs = self.model._encode_text(tokens)
        logits = self.model.text_decoder(image_embs, token_embs[:, :-1])
        return logits, tokens[:, 1:]

    def caption_loss(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ``tokens`` given the [0,1] pixels (padding ignored)."""
        logits, labels = self.caption_logits(x, tokens)
        return F.cross_entropy(logits.permute(0, 2, 1), labels, ignore_index=self.pad_id)

    def _step_fn(self, image_embs: torch.Tensor, image_latent: torch.Tensor) -> StepFn:
        def step(rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
            ctx = self.model.context_length
            out = self.model(
                None, tokens[:, -ctx:], image_latent=image_latent[rows], image_embs=image_embs[rows], output_labels=False
            )
            return out["logits"][:, -1]

        return step

    @torch.no_grad()
    def generate(
        self,
        x: torch.Tensor,
        method: str = "beam_search",
        seq_len: int = 30,
        min_seq_len: int = 5,
        num_beams: int = 6,
        num_beam_groups: int = 3,
        top_k: int = 1,
        top_p: float = 0.1,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        beam_scores: str = "logits",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """[0,1] pixels ``(B, 3, S, S)`` -> token ids ``(B, L)`` (SOT first). Defaults = open_clip's."""
        was_training = self.training
        self.eval()
        x = x.to(self._device)  # images may come from a CPU data loader; decoding runs on the model's device
        try:
            latent, embs = self.image_tokens(x)
            if method == "beam_search":
                width = max(1, num_beams // max(1, num_beam_groups))
                latent = latent.repeat_interleave(width, dim=0)
                embs = embs.repeat_interleave(width, dim=0)
                return beam_search(
                    self._step_fn(embs, latent), x.shape[0], num_beams=num_beams, num_beam_groups=num_beam_groups,
                    seq_len=seq_len, min_seq_len=min_seq_len, repetition_penalty=repetition_penalty,
                    scores=beam_scores, pad_id=self.pad_id, device=x.device,
                )
            if method in ("top_k", "top_p"):
                return sample(
                    self._step_fn(embs, latent), x.shape[0], method=method, top_k=top_k, top_p=top_p,
                    temperature=temperature, seq_len=seq_len, min_seq_len=min_seq_len,
                    repetition_penalty=repetition_penalty, pad_id=self.pad_id, generator=generator, device=x.device,
                )
            raise unknown_name("generation method", method, ["beam_search", "top_k", "top_p"])
        finally:
            self.train(was_training)

    def decode(self, ids: torch.Tensor) -> list[str]:
        """Token ids -> caption strings: text between SOT and the first EOS, whitespace-trimmed."""
        out = []
        for row in ids.tolist():
            if row and row[0] == SOT_ID:
                row = row[1:]
            if EOT_ID in row:
                row = row[: row.index(EOT_ID)]
            out.append(self.tokenizer.decode(row).strip())
        return out

    def caption(self, x: torch.Tensor, **kw) -> list[str]:
        """[0,1] pixels -> generated captions (see `generate` for the options)."""
        return self.decode(self.generate(x, **kw))


def _resolve_checkpoint(architecture: str, weights: str | None) -> Path:
    """A tag of open_clip's registry -> its file in the local HF cache; else a local file/folder
    (a misspelt tag gets the closest one, see `medkt.weights.resolve_open_clip_weights`)."""
    from medkt.weights import resolve_open_clip_weights

    return resolve_open_clip_weights(architecture, weights, what=f"CoCa {architecture}", how_to_get=HOW_TO_GET,
                                     filenames=CHECKPOINT_NAMES)[0]


def create(architecture: str, weights: str | None, **kw) -> CocaBackend:
    """Factory for ``coca:<open_clip CoCa config>@<tag | path | random>``."""
    import open_clip

    register_tiny_configs()
    if architecture == "tiny":
        architecture = "coca_tiny"
    known = [m for m in open_clip.list_models() if m.startswith("coca")]
    if architecture not in known:
        raise unknown_name("CoCa architecture", architecture, known)
    from medkt.weights import offline, open_clip_tag_options, quiet_random_init_notice

    path = None
    options: dict[str, Any] = {}
    if weights != "random":  # find the checkpoint before building a large model
        path = _resolve_checkpoint(architecture, weights)
        if open_clip.is_pretrained_cfg(architecture, weights):
            options = open_clip_tag_options(architecture, weights)  # the tag's preprocessing
    torch.manual_seed(int(kw.pop("seed", 0)))
    # the weights are loaded below: open_clip's "initialized randomly" notice would be a false alarm
    quiet = quiet_random_init_notice() if path is not None else nullcontext()
    with offline(), quiet:
        model = open_clip.create_model(architecture, pretrained=None, device="cpu", **options)
    if weights == "random":
        # open_clip 3.3.0 never initialises the decoder's output projection (its
        # init_parameters() is broken and uncalled): it stays torch.empty, often all zeros, so
        # every token would tie in a random model. Use the std open_clip intended.
        proj = model.text_decoder.text_projection
        with torch.no_grad():
            proj.normal_(std=model.text_decoder.width**-0.5)
    if path is not None:
        open_clip.load_checkpoint(model, str(path))
    cfg = model.visual.preprocess_cfg if hasattr(model.visual, "preprocess_cfg") else {}
    mean = cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = cfg.get("std", open_clip.OPENAI_DATASET_STD)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return CocaBackend(model, open_clip.get_tokenizer(architecture), size, mean, std)


__all__ = ["CocaBackend", "beam_search", "sample", "create", "register_tiny_configs"]
