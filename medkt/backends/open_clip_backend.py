"""open_clip CLIP backend (family ``open_clip``, alias ``clip``).

Specs: ``clip:ViT-B-32@/models/ViT-B-32.pt`` (a local checkpoint file or open_clip model folder),
``clip:ViT-B-32@openai`` (an open_clip pretrained tag, resolved with open_clip's registry from the
local caches only; see `medkt.weights.open_clip_tag_checkpoint`), ``clip:medkt-tiny-ViT@random``
(random weights; tiny configs ship in ``medkt/configs/open_clip/``), ``clip:hf-hub:org/repo`` (an
open_clip hub model from the local HF cache, see `medkt.backends.biomedclip`).

Checkpoint files: OpenAI's TorchScript release archives are read by open_clip's own loader (its
``create_model`` with ``weights_only=False``, which only archives get); state dicts and open_clip
checkpoints as open_clip reads them. The MLP activation (QuickGELU for OpenAI-trained weights, GELU
for most others) comes from the file when it says (`checkpoint_activation`), else from the
user (a ``-quickgelu`` architecture or ``quick_gelu=``); a plain state dict that says nothing, for an
architecture open_clip has weights of both kinds for, is a `ConfigError` naming both fixes.

Images are preprocessed by open_clip's own eval transform built from the model's
``visual.preprocess_cfg`` (short side resized, centre crop; the tag's interpolation/resize mode),
see `medkt.data.images.open_clip_pixels`.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medkt.backends.base import AnyResolution, Backend, FeatureBlocks, ImageTextEmbedder
from medkt.backends.vit_fastpath import install_fast_paths
from medkt.errors import ConfigError, unknown_name
from medkt.weights import (
    README_HINT,
    offline,
    open_clip_tag_checkpoint,  # noqa: F401 - re-exported for importers
    open_clip_tag_options,
    quiet_random_init_notice,
    resolve_open_clip_weights,
    resolve_weights,  # noqa: F401 - re-exported for importers
    weights_file_kind,
    zip_archive_error,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "open_clip"
_registered = False


def register_medkt_configs() -> None:
    """Make medkt's tiny open_clip JSON configs known to ``open_clip.create_model``."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


_offline = offline  # old name, kept for importers


def open_clip_blocks(visual: nn.Module, what: str) -> list[nn.Module]:
    """An open_clip image tower's blocks in forward order: a ViT's ``transformer.resblocks`` (run
    batch-first), a timm trunk's ``blocks`` (BiomedCLIP) or a ModifiedResNet's ``layer1..4``;
    otherwise a `ConfigError` naming ``what`` (the model)."""
    transformer = getattr(visual, "transformer", None)
    if isinstance(getattr(transformer, "resblocks", None), nn.ModuleList):
        if not getattr(transformer, "batch_first", True):  # the hooks would see (T, B, D)
            raise ConfigError("feature blocks need an open_clip VisionTransformer run batch-first "
                              "(open_clip >= 2.24 default)")
        return list(transformer.resblocks)
    trunk = getattr(visual, "trunk", None)
    if isinstance(getattr(trunk, "blocks", None), (nn.ModuleList, nn.Sequential)):
        return list(trunk.blocks)
    stages = [getattr(visual, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(m, nn.Module) for m in stages):
        return stages
    raise ConfigError(f"open_clip image tower {type(visual).__name__} of {what!r}: medkt does not know its blocks "
                      "(ViT resblocks, timm blocks, ResNet layers)")


class OpenClipBackend(Backend, ImageTextEmbedder, AnyResolution, FeatureBlocks):
    """An open_clip ``CLIP`` (or ``CustomTextCLIP``) behind the backend protocol, preprocessed by
    open_clip's own eval transform of the model."""

    family = "open_clip"

    def __init__(self, model: nn.Module, tokenizer, architecture: str, mean, std):
        super().__init__()
        self.model = model
        self._tokenizer = tokenizer
        self.architecture = architecture
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean, self.std = tuple(mean), tuple(std)
        install_fast_paths(self, model)

    def accepts_any_size(self) -> bool:
        """ViT towers with medkt's position-embedding fast path take any input size."""
        return bool(self.fast_paths["embeds"])

    def feature_modules(self) -> list[nn.Module]:
        """The image tower's blocks (`open_clip_blocks`)."""
        return open_clip_blocks(self.model.visual, self.spec or self.architecture)

    def load_image(self, image: Any) -> torch.Tensor:
        """open_clip's eval preprocessing of this model (its ``preprocess_cfg``) -> ``(3, S, S)`` in [0, 1]."""
        from medkt.data.images import open_clip_pixels

        return open_clip_pixels(image, self.model.visual.preprocess_cfg)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts)).to(self.model.logit_scale.device)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def visual_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.visual.parameters()

    def text_parameters(self) -> Iterator[nn.Parameter]:
        visual = {id(p) for p in self.model.visual.parameters()}
        skip = visual | {id(self.model.logit_scale)}
        if getattr(self.model, "logit_bias", None) is not None:
            skip.add(id(self.model.logit_bias))
        return (p for p in self.model.parameters() if id(p) not in skip)

    def token_embedding(self) -> nn.Embedding:
        # CLIP keeps it at the top level; CustomTextCLIP (e.g. SigLIP / HF text towers) in .text
        emb = getattr(self.model, "token_embedding", None) or getattr(getattr(self.model, "text", None), "token_embedding", None)
        if not isinstance(emb, nn.Embedding):
            return super().token_embedding()
        return emb

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100.0)


#: entries of the state dict of OpenAI's TorchScript release files that are not weights; open_clip
#: drops them when it loads such an archive, and only OpenAI's files carry them
OPENAI_ARCHIVE_KEYS = ("input_resolution", "context_length", "vocab_size")
#: checkpoint names in an open_clip model folder (an HF snapshot), in open_clip's order of preference
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
HOW_TO_GET = ("Download the {arch} checkpoint on a machine with internet access (e.g. OpenAI's release file "
              "ViT-B-32.pt, or an open_clip HF repo's folder) and pass its local path as 'clip:{arch}@/path/to/file'")


@contextmanager
def _quiet_torch_load_warnings() -> Iterator[None]:
    """torch warns when ``torch.load`` hands a TorchScript archive to ``torch.jit.load`` and that
    ``torch.jit.load`` is deprecated; both are about how the archive is read, not for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TorchScript archive dispatching to")
        warnings.filterwarnings("ignore", message=".*torch.jit.load.* is deprecated")
        yield


def checkpoint_activation(path: str | Path) -> tuple[bool | None, str]:
    """What a checkpoint file itself says about its MLP activation: ``(quick_gelu, reason)``.

    ``quick_gelu`` is True (QuickGELU, as OpenAI trained CLIP), False (GELU) or None (the file
    does not say). Signals, strongest first:

    * a TorchScript archive keeps the class of each module: ``QuickGELU`` or ``GELU``;
    * a plain state dict holding `OPENAI_ARCHIVE_KEYS` was taken from OpenAI's release
      archive (only those carry them) -> QuickGELU;
    * an ``open_clip_config.json`` beside the file (open_clip's model-folder layout, as in an HF
      snapshot) -> its ``model_cfg.quick_gelu`` (default False), as open_clip's ``local-dir:`` and
      ``hf-hub:`` loaders read it.

    The key layout alone cannot tell: open_clip's ``CLIP`` keeps OpenAI's parameter names.
    """
    import json

    path = Path(path)
    kind = weights_file_kind(path)
    if kind == "torchscript":
        with _quiet_torch_load_warnings():
            archive = torch.jit.load(str(path), map_location="cpu")
        found = {m.original_name for _, m in archive.named_modules()} & {"QuickGELU", "GELU"}
        if len(found) == 1:
            return "QuickGELU" in found, f"the TorchScript archive's modules are {found.pop()}"
        if any(k in archive.state_dict() for k in OPENAI_ARCHIVE_KEYS):
            return True, f"the TorchScript archive holds OpenAI's entries ({', '.join(OPENAI_ARCHIVE_KEYS)})"
    elif kind in ("torch", "safetensors"):
        keys = _state_dict_keys(path)
        if keys is not None and any(k in keys for k in OPENAI_ARCHIVE_KEYS):
            return True, f"the state dict holds OpenAI's archive entries ({', '.join(OPENAI_ARCHIVE_KEYS)})"
    config = path.parent / "open_clip_config.json"
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {config}: {exc}") from None
        model_cfg = cfg.get("model_cfg", cfg) if isinstance(cfg, dict) else {}
        return bool(model_cfg.get("quick_gelu", False)), f"{config} sets quick_gelu={bool(model_cfg.get('quick_gelu', False))}"
    return None, "the file does not say"


def _state_dict_keys(path: Path) -> set[str] | None:
    """Top-level names of a state dict file (after open_clip's ``state_dict``/``module.`` unwrapping),
    or None when it cannot be read (open_clip's loader then reports the file)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return set(f.keys())
        except Exception:  # noqa: BLE001 - reported by open_clip's loader with its own message
            return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be mmapped; others fail again below
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001
            return None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        return None
    return {k[7:] if k.startswith("module.") else k for k in state}


def activation_is_ambiguous(architecture: str) -> bool:
    """True when open_clip knows weights of this shape trained with QuickGELU as well as GELU (a
    ``-quickgelu`` twin config, or a pretrained tag with ``quick_gelu``) while the config itself
    says GELU: a bare file for it could be either."""
    import open_clip

    if (open_clip.get_model_config(architecture) or {}).get("quick_gelu", False):
        return False
    twin = f"{architecture}-quickgelu" in open_clip.list_models()
    tags = any((open_clip.get_pretrained_cfg(architecture, t) or {}).get("quick_gelu", False)
               for t in open_clip.list_pretrained_tags_by_model(architecture))
    return twin or tags


def _decide_quick_gelu(architecture: str, path: Path, declared: bool | None) -> bool:
    """The activation for a local checkpoint file: the file's own signal, else what the user
    declared (``quick_gelu=`` or a ``-quickgelu`` architecture); a disagreement between the two,
    or neither for an architecture open_clip has both kinds of weights for, is a ConfigError."""
    import open_clip

    named = bool((open_clip.get_model_config(architecture) or {}).get("quick_gelu", False))
    if declared is False and named:
        raise ConfigError(f"quick_gelu=False contradicts the architecture {architecture}, which uses QuickGELU; "
                          f"drop one of them")
    explicit = declared if declared is not None else (True if named else None)
    from_file, why = checkpoint_activation(path)
    act = {True: "QuickGELU", False: "GELU"}
    if from_file is not None and explicit is not None and from_file != explicit:
        raise ConfigError(f"{path} needs {act[from_file]} ({why}) but {act[explicit]} was asked for "
                          f"({'quick_gelu=' + str(declared) if declared is not None else 'architecture ' + architecture}); "
                          f"drop the request or check the file")
    if from_file is not None:
        return from_file
    if explicit is not None:
        return explicit
    if activation_is_ambiguous(architecture):
        base = architecture
        quick_name = f"{base}-quickgelu" if f"{base}-quickgelu" in open_clip.list_models() else None
        quick_fix = (f"'clip:{quick_name}@{path}' (or quick_gelu=True)" if quick_name else "quick_gelu=True")
        raise ConfigError(
            f"{path} is a plain state dict that does not say whether open_clip {architecture} must use QuickGELU "
            f"(OpenAI's CLIP and other QuickGELU-trained weights) or GELU (most open_clip/LAION-2B weights); a wrong "
            f"guess shifts every embedding without an error. Say which: QuickGELU with {quick_fix}; GELU with "
            f"quick_gelu=False (create_backend(spec, quick_gelu=False); in a bundle backend_options#quick_gelu=false) "
            f"or open_clip's open_clip_config.json beside the file ({README_HINT})"
        )
    return False  # open_clip has no QuickGELU weights of this shape: its config (GELU) decides


def create(architecture: str, weights: str | None, *, quick_gelu: bool | None = None, **kwargs) -> OpenClipBackend:
    """Build an open_clip model (see the module docstring for the specs).

    Args:
        quick_gelu: the MLP activation the weights were trained with (True: QuickGELU, as OpenAI's
            CLIP; False: GELU). Needed only for a plain state dict that does not say (see
            `checkpoint_activation`); it must agree with the file or tag when they do.
        **kwargs: passed to ``open_clip.create_model``.
    """
    import open_clip

    register_medkt_configs()
    if architecture not in open_clip.list_models():
        raise unknown_name("open_clip architecture", architecture, open_clip.list_models())
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise ConfigError(f"quick_gelu must be true or false, got {quick_gelu!r}")
    if kwargs.pop("force_quick_gelu", False):  # open_clip's own keyword: a declaration too
        quick_gelu = True if quick_gelu is None else quick_gelu
    pretrained: str | None = None
    options: dict[str, Any] = {}
    load_kwargs: dict[str, Any] = {}
    openai_dict: dict[str, torch.Tensor] | None = None
    if weights == "random":
        options["force_quick_gelu"] = bool(quick_gelu)
    else:
        path, is_tag = resolve_open_clip_weights(
            architecture, weights, what=f"open_clip {architecture}",
            how_to_get=HOW_TO_GET.format(arch=architecture), filenames=CHECKPOINT_NAMES)
        kind = weights_file_kind(path) if path.is_file() else "torch"
        if kind == "zip":
            raise zip_archive_error(path, f"pass the checkpoint file inside as 'clip:{architecture}@/path/to/file'")
        if is_tag:
            # a tag: its file is found in the local caches and open_clip gets the local path, plus
            # what the tag implies (preprocessing, QuickGELU)
            options = open_clip_tag_options(architecture, weights)
            if quick_gelu is not None and quick_gelu != options["force_quick_gelu"]:
                raise ConfigError(f"quick_gelu={quick_gelu} contradicts the pretrained tag {architecture}@{weights} "
                                  f"(quick_gelu={options['force_quick_gelu']}); drop quick_gelu")
        else:
            options["force_quick_gelu"] = _decide_quick_gelu(architecture, path, quick_gelu)
            if kind in ("torch", "safetensors") and options["force_quick_gelu"]:
                openai_dict = _openai_archive_state_dict(path)
        if kind == "torchscript":
            # open_clip reads TorchScript archives (OpenAI's release files) through torch.load,
            # which refuses them with weights_only=True; an archive holds no pickled Python objects
            # to guard against (torch.load hands it to torch.jit.load)
            load_kwargs["weights_only"] = False
        pretrained = str(path)
    options = {**options, **kwargs}  # the caller's open_clip keywords win (e.g. force_preprocess_cfg)
    try:
        with offline(), _quiet_torch_load_warnings():  # pretrained is a local file or None: nothing to fetch
            if openai_dict is not None:
                # a state dict taken from OpenAI's archive: open_clip strips OPENAI_ARCHIVE_KEYS only
                # from archives, so the same dict is loaded here without them (strict: the shapes
                # must be those of the named architecture)
                with quiet_random_init_notice():
                    model = open_clip.create_model(architecture, pretrained=None, device="cpu", **options)
                model.load_state_dict(openai_dict)
            else:
                model = open_clip.create_model(architecture, pretrained=pretrained, device="cpu", **options,
                                               **load_kwargs)
            # bundled BPE for CLIP; HF-tokenizer models (SigLIP...) need their tokenizer cached
            tokenizer = open_clip.get_tokenizer(architecture)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise ConfigError(f"could not build open_clip {architecture} from {pretrained}: {' '.join(first[:3])[:600]} "
                          f"(is the file a checkpoint of {architecture}?)") from exc
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return OpenClipBackend(model, tokenizer, architecture, mean, std)


def _openai_archive_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """The weights of a state dict taken from OpenAI's archive (without `OPENAI_ARCHIVE_KEYS`),
    or None for any other state dict (open_clip's own loader reads those)."""
    import open_clip

    state = open_clip.factory.load_state_dict(str(path), device="cpu", weights_only=True)
    if not any(k in state for k in OPENAI_ARCHIVE_KEYS):
        return None
    return {k: v for k, v in state.items() if k not in OPENAI_ARCHIVE_KEYS}
