"""Whole-word masking for masked-language-model transfer with ViLT (paper §8.9, Tab. 11).

Same recipe as ViLT pre-training (BERT's whole-word masking): word pieces starting with ``##``
belong to the previous word; about 15 % of the tokens are chosen by picking whole words in
random order (at least one word); each chosen token becomes ``[MASK]`` with p = 0.8, a random
token with p = 0.1 and stays unchanged otherwise. Labels are -100 everywhere else.
"""
from __future__ import annotations

import torch


def word_groups(tokens: list[str], special: set[str]) -> list[list[int]]:
    """Positions grouped into whole words (``##`` pieces join the previous word; specials skipped)."""
    groups: list[list[int]] = []
    for i, t in enumerate(tokens):
        if t in special:
            continue
        if groups and t.startswith("##") and groups[-1][-1] == i - 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def whole_word_mask(tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    probability: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask a batch ``(B, L)`` of token ids -> (masked ids, labels with -100 on unmasked positions)."""
    if not 0 < probability < 1:
        raise ValueError(f"masking probability must be in (0, 1), got {probability}")
    ids = input_ids.clone()
    labels = torch.full_like(ids, -100)
    special = set(tokenizer.all_special_tokens)
    vocab = len(tokenizer)
    for b in range(ids.shape[0]):
        n = int(attention_mask[b].sum()) if attention_mask is not None else ids.shape[1]
        toks = tokenizer.convert_ids_to_tokens(ids[b, :n].tolist())
        groups = word_groups(toks, special)
        if not groups:
            continue
        budget = max(1, int(round(n * probability)))
        order = torch.randperm(len(groups), generator=generator).tolist()
        chosen: list[int] = []
        for gi in order:
            if len(chosen) >= budget:
                break
            if len(chosen) + len(groups[gi]) > budget and chosen:
                continue
            chosen += groups[gi]
        for pos in chosen:
            labels[b, pos] = ids[b, pos]
            r = float(torch.rand((), generator=generator))
            if r < 0.8:
                ids[b, pos] = tokenizer.mask_token_id
            elif r < 0.9:
                ids[b, pos] = int(torch.randint(vocab, (), generator=generator))
    return ids, labels


__all__ = ["whole_word_mask", "word_groups"]
