"""Text-side transfer: learn only the input embeddings of the new concept's name tokens.

``FinetuneConfig.train = "concept_tokens"`` (off by default; the paper fine-tunes the visual
encoder). Every weight of the model stays frozen except the rows of the text tower's token
embedding that spell the *new* concept's name ("nodule" -> its BPE pieces), which are trained
with the ordinary fine-tuning loss on the synthesised images (textual inversion, run the other
way round: the images come from the text). Why it exists: in the phantom world every
visual-encoder fine-tuning tried (full, LoRA, WiSE-FT, replay, distillation, last blocks) moved the
known findings' images too, so naming the new finding cost known-class accuracy. Here the image
embeddings and the known classes' text embeddings cannot move, so the only way known accuracy can
drop is images taken by the new class — the forgetting this option allows is exactly the
confusion with the new concept.

Tokens the new name shares with another concept's name (e.g. "pneu", "mo" of pneumoperitoneum and
pneumothorax) are left alone, so the other concept's prompts do not change; a name that has no
token of its own is refused. The learned offsets are added to the embedding rows at the end
(`ConceptTokens.merge`; a ``wise`` fine-tuning control scales them first), so the saved weights load like any other.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from medkt.errors import ConfigError


def _token_ids(tokens) -> torch.Tensor:
    """``backend.tokenize`` output (a tensor or a dict with ``input_ids``) -> ids ``(B, L)``."""
    if hasattr(tokens, "keys"):  # a dict or transformers' BatchEncoding
        tokens = tokens["input_ids"]
    return torch.as_tensor(tokens)


def name_token_ids(backend, name: str) -> list[int]:
    """Ids of the tokens spelling ``name`` (start/end/padding tokens removed), in order."""
    special = set(_token_ids(backend.tokenize([""]))[0].tolist())
    out: list[int] = []
    for i in _token_ids(backend.tokenize([name]))[0].tolist():
        if i not in special and i not in out:
            out.append(i)
    return out


class ConceptTokens:
    """Trainable offsets ``(T, E)`` on the token-embedding rows of ``names``' own tokens.

    A forward hook on the embedding adds ``delta[k]`` wherever token ``ids[k]`` occurs, so the
    module tree and its weights are untouched until `merge`; `remove` drops the hook.

    Args:
        backend: a backend whose `token_embedding` returns its text token ``nn.Embedding``.
        names: the new concepts (their name tokens train).
        other_names: concepts whose prompts must not change (their tokens are excluded).
    """

    def __init__(self, backend, names: Sequence[str], other_names: Sequence[str]):
        self.embedding: nn.Embedding = backend.token_embedding()
        shared = {i for n in other_names for i in name_token_ids(backend, n)}
        ids: list[int] = []
        for name in names:
            own = [i for i in name_token_ids(backend, name) if i not in shared]
            if not own:
                raise ConfigError(f"train='concept_tokens': every token of the concept name {name!r} also spells "
                                  f"another concept's name ({sorted(other_names)}), so it cannot be learned "
                                  f"without changing that concept; give the new concept a distinct name")
            ids += [i for i in own if i not in ids]
        self.ids = ids
        w = self.embedding.weight
        self.delta = nn.Parameter(torch.zeros(len(ids), w.shape[1], device=w.device, dtype=torch.float32))
        self._index = torch.tensor(ids, device=w.device)
        self._hook = self.embedding.register_forward_hook(self._add)

    def _add(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        ids = inputs[0]
        match = (ids.unsqueeze(-1) == self._index.to(ids.device)).to(self.delta.dtype)  # (..., T)
        return output + (match @ self.delta).to(output.dtype)

    def parameters(self) -> list[nn.Parameter]:
        """The trainable offsets (one ``(T, E)`` parameter; not registered on the backend)."""
        return [self.delta]

    @torch.no_grad()
    def merge(self, alpha: float = 1.0) -> None:
        """Add ``alpha * delta`` to the embedding rows and drop the hook (WiSE-FT's ``alpha``)."""
        self.remove()
        w = self.embedding.weight
        w[self._index.to(w.device)] += (alpha * self.delta).to(w.dtype)

    def remove(self) -> None:
        """Drop the hook without merging (after an error; a no-op once merged)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


__all__ = ["ConceptTokens", "name_token_ids"]
