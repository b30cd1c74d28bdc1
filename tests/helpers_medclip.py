"""Shared helpers for the MedCLIP / CXR tests: offline construction of upstream ``medclip``
classes and synthetic chest X-ray files in the real on-disk formats."""
from __future__ import annotations

import contextlib

import torch

# synthetic radiographs, shared with benchmarks.gpu_smoke
from benchmarks.common import chest_like  # noqa: F401
from benchmarks.common import write_radiograph_dicom as write_dicom  # noqa: F401


@contextlib.contextmanager
def offline_upstream_medclip(monkeypatch, bert_kwargs: dict, swin_kwargs: dict, tokenizer):
    """Make ``medclip``'s hub loaders build from configs, and ``.cuda()`` a no-op.

    ``AutoModel.from_pretrained(BERT_TYPE, output_hidden_states=True)`` -> ``BertModel(BertConfig(...))``,
    ``AutoModel.from_pretrained(VIT_TYPE)`` -> ``SwinModel(SwinConfig(...))``,
    ``AutoTokenizer.from_pretrained(...)`` -> ``tokenizer``.
    """
    import medclip.modeling_medclip as mm
    from medclip import constants
    from transformers import BertConfig, BertModel, SwinConfig, SwinModel

    class _AutoModel:
        @staticmethod
        def from_pretrained(name, **kw):
            if name == constants.BERT_TYPE:
                return BertModel(BertConfig(**bert_kwargs, **kw))
            if name == constants.VIT_TYPE:
                return SwinModel(SwinConfig(**swin_kwargs, **kw))
            raise AssertionError(f"unexpected hub model {name}")

    class _AutoTokenizer:
        @staticmethod
        def from_pretrained(name, **kw):
            return tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(mm, "AutoModel", _AutoModel)
    monkeypatch.setattr(mm, "AutoTokenizer", _AutoTokenizer)
    # upstream moves every input to CUDA; on this CPU-only machine .cuda() must be the identity
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    yield mm
