"""LoRA fine-tuning of a backend's encoder through ``peft`` (paper §7.3, "Catastrophic forgetting").

Instead of updating the visual encoder's weights ``W``, fine-tuning learns a low-rank update
``W + (alpha / rank) * B @ A`` on its Linear and Conv layers; only ``A`` and ``B`` train. At the
end the update is **merged** into ``W`` and the peft layers are removed, so the backend has its
original module tree and the saved weights (`medkt.finetune.save_finetuned`) load like any
other. Enabled by the ``lora`` sub-section of `FinetuneConfig`
(off by default: the paper fine-tunes all visual weights):

    "finetune": {"lr": 3e-4, "lora": {"rank": 8, "alpha": 16, "dropout": 0.0,
                                      "target_modules": null}}

``target_modules`` is a list of regular expressions matched (``re.search``) against module
names, e.g. ``["conv2$"]`` or ``["mlp"]``; None = the family's default
(`DEFAULT_TARGETS`), else every Linear / Conv2d layer of the trained encoder (the phantom
CNN's convolutions and projection; HF CLIP / MedCLIP attention q/k/v/out and MLP Linear layers).
``nn.MultiheadAttention`` is never targeted: peft re-creates its weight parameters on merge, and
its ``out_proj`` Linear is not called through ``forward`` (an adapter there would be ignored). So
open_clip / CoCa ViTs get LoRA on their MLPs (their patch embedding conv is read directly by the
ViT fast path and their attention is an ``nn.MultiheadAttention``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable

from typing import Annotated, Any

import torch
from torch import nn

from medkt.errors import ConfigError
from medkt.config_model import Range, build, config_dataclass, recheck

#: layer types LoRA is applied to (peft supports them; grouped convolutions are skipped)
_LAYER_TYPES = (nn.Linear, nn.Conv2d)

#: backend family -> default ``target_modules`` (families not listed: every Linear / Conv2d layer)
DEFAULT_TARGETS: dict[str, list[str]] = {"open_clip": [r"\.mlp\."], "coca": [r"\.mlp\."]}


@config_dataclass
class LoraSettings:
    """The ``lora`` sub-section of `FinetuneConfig`."""

    rank: Annotated[int, Range(ge=1)] = 8
    alpha: Annotated[float, Range(gt=0)] = 16.0
    dropout: Annotated[float, Range(ge=0, lt=1)] = 0.0
    #: regexes matched against module names (None: every Linear / Conv2d layer being trained)
    target_modules: list[str] | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | "LoraSettings" | None, path: str = "finetune#lora") -> "LoraSettings":
        """Checked by `medkt.config_model` (types and ranges are the annotations above)."""
        if isinstance(d, LoraSettings):
            d.validate(path)
            return d
        return build(cls, d, path, what="lora")

    def validate(self, path: str = "finetune#lora") -> None:
        """Types and ranges (the annotations) and that every ``target_modules`` entry compiles."""
        recheck(self, path)
        for i, t in enumerate(self.target_modules or []):
            try:
                re.compile(t)
            except re.error as exc:
                raise ConfigError(f"{path}#target_modules#{i} = {t!r}: expected a regular expression ({exc})",
                                  key=f"{path}#target_modules#{i}") from None


def lora_targets(model: nn.Module, params: Iterable[nn.Parameter], patterns: list[str] | None = None) -> list[str]:
    """Names of the Linear / Conv2d modules of ``model`` whose weight is in ``params``.

    ``patterns`` (regexes, ``re.search``) narrow the choice. Layers inside an
    ``nn.MultiheadAttention`` and grouped convolutions are skipped (see the module docstring).
    """
    ids = {id(p) for p in params}
    mha_children = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                    for c, _ in m.named_children()}
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, _LAYER_TYPES) or id(m.weight) not in ids or name in mha_children:
            continue
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue
        if patterns and not any(re.search(p, name) for p in patterns):
            continue
        out.append(name)
    return out


class LoraAdapter:
    """LoRA adapters injected into ``backend`` (in place) on the layers holding ``params``.

    ``parameters()`` are the adapter weights to optimise; `merge` folds them into the base
    weights and restores the original modules; `remove` drops them without merging.
    Base weight tensors stay the same objects throughout (merging updates them in place).
    """

    def __init__(self, backend: nn.Module, settings: LoraSettings, params: Iterable[nn.Parameter]):
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:  # pragma: no cover - peft is a dependency
            raise ConfigError("LoRA fine-tuning needs the 'peft' package: pip install 'peft>=0.13'") from exc
        params = list(params)
        patterns = settings.target_modules
        if patterns is None:
            patterns = DEFAULT_TARGETS.get(backend.family)
        targets = lora_targets(backend, params, patterns)
        if not targets:
            names = [n for n, m in backend.named_modules() if isinstance(m, _LAYER_TYPES)][-6:]
            raise ConfigError(f"lora target_modules {patterns} match no Linear/Conv2d layer of the "
                              f"trained encoder; layer names end with: {', '.join(names)}")
        self.backend = backend
        self.targets = targets
        self.adapter_name = "medkt"
        cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                         target_modules=targets, bias="none")
        # exact names: peft matches a list entry against the whole name (or a "."-suffix of it)
        inject_adapter_in_model(cfg, backend, adapter_name=self.adapter_name)
        self._params = [p for n, p in backend.named_parameters() if "lora_" in n]
        self._active = True

    def parameters(self) -> list[nn.Parameter]:
        """The adapters' ``lora_A`` / ``lora_B`` weights (the only ones fine-tuning trains)."""
        return list(self._params)

    def num_parameters(self) -> int:
        """Number of trainable adapter values."""
        return sum(p.numel() for p in self._params)

    def _layers(self) -> list[tuple[nn.Module, str, nn.Module]]:
        from peft.tuners.lora import LoraLayer

        out = []
        for name, m in list(self.backend.named_modules()):
            if isinstance(m, LoraLayer):
                parent_name, _, child = name.rpartition(".")
                parent = self.backend.get_submodule(parent_name) if parent_name else self.backend
                out.append((parent, child, m))
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``W += scale * B @ A`` into every adapted layer and put the plain layers back."""
        self._unload(merge=True)

    def remove(self) -> None:
        """Drop the adapters without changing the base weights (e.g. after an error)."""
        self._unload(merge=False)

    def _unload(self, merge: bool) -> None:
        if not self._active:
            return
        for parent, child, layer in self._layers():
            if merge:
                layer.merge(adapter_names=[self.adapter_name])
            setattr(parent, child, layer.get_base_layer())
        self._active = False
