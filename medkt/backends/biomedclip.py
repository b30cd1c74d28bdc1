"""BiomedCLIP backend (family ``biomedclip``), and any open_clip ``hf-hub:`` model, from the local
Hugging Face cache only.

BiomedCLIP (Zhang et al., NEJM AI 2024) is the CLIP of MedCLIP-SAMv2 and of the paper's
zero-shot segmentation experiment: open_clip's hub model
``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, a timm ViT-B/16 image tower
(224 px) and a PubMedBERT (BiomedBERT) text tower through open_clip's ``HFTextEncoder`` (context
length 256).

Specs:

* ``biomedclip:vit-b16`` - config and weights of the hub repo, read from the local HF cache
  (``open_clip_config.json`` + ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``).
* ``biomedclip:vit-b16@/path/to/checkpoint`` - the same architecture with the weights of a local
  file, e.g. MedCLIP-SAMv2's DHN-NCE fine-tuned BiomedCLIP: its released ``pytorch_model.bin``
  (MedCLIP-SAMv2's Hugging Face re-packaging, keys ``vision_model.*``/``text_model.*``), the
  open_clip ``.pt`` its fine-tuning script writes (keys ``visual.*``/``text.*``, optionally under
  ``state_dict``/``model`` and prefixed ``module.``/``model.``), or a folder holding one of them.
* ``biomedclip:vit-b16@org/repo`` - another open_clip hub repo of the same layout in the cache.
* ``biomedclip:vit-b16@random`` - random weights (tests).
* ``clip:hf-hub:org/repo`` - any open_clip hub model the same way (``@weights`` as above).

The text tower's ``config.json`` and the tokenizer files are read from the cache folders of the
repos that ``open_clip_config.json`` names (``text_cfg.hf_model_name`` / ``hf_tokenizer_name``;
for BiomedCLIP ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``). open_clip's own
``hf-hub:`` path would ask the hub for them; here every file is located in the cache first (a
missing one is a one-line `WeightsNotFoundError` naming the repo, the file
and the ``hf download`` command) and the libraries are then given local folders only.

The model is open_clip's own ``CustomTextCLIP``, built by ``open_clip.create_model`` from the
cached snapshot folder (``local-dir:``), so its embeddings are those of
``open_clip.create_model_and_transforms("hf-hub:...")`` (tests/test_biomedclip.py checks this).
Preprocessing is open_clip's eval transform from the model's ``preprocess_cfg`` (BiomedCLIP:
bicubic resize of the short side to 224, centre crop, CLIP mean/std). M2IB uses the timm split
registered in `medkt.segmentation.m2ib` (block index over ``visual.trunk.blocks``; 12 blocks,
MedCLIP-SAMv2 bottlenecks block 9).
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch

from medkt.backends.open_clip_backend import OpenClipBackend
from medkt.errors import CheckpointError, ConfigError, WeightsNotFoundError, unknown_name
from medkt.weights import (
    BIOMEDCLIP_REPOS,
    OPEN_CLIP_HUB_WEIGHTS,
    _fetch_hint,
    _looks_like_repo_id,
    hf_cache_dir,
    hf_cached_file,
    offline,
    resolve_weights,
)

#: architecture name in the spec -> open_clip hub repo (defined with the torch-free weight checks)
ARCHITECTURES = BIOMEDCLIP_REPOS
BIOMEDCLIP_REPO = ARCHITECTURES["vit-b16"]
CONFIG_NAME = "open_clip_config.json"
#: open_clip's own order (open_clip.pretrained.download_pretrained_from_hf / _find_checkpoint_in_dir)
HUB_WEIGHT_NAMES = OPEN_CLIP_HUB_WEIGHTS
#: files looked for when ``@weights`` is a folder (MedCLIP-SAMv2 keeps ``pytorch_model.bin``)
FOLDER_WEIGHT_NAMES = HUB_WEIGHT_NAMES + ("pytorch_model.bin", "model.safetensors", "weights.pth")
#: the tokenizer needs one of these (WordPiece vocabulary or a fast-tokenizer file)
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json")
MEDCLIP_SAMV2_HINT = (
    "MedCLIP-SAMv2's fine-tuned BiomedCLIP is the pytorch_model.bin linked from its README "
    "(github.com/HealthX-Lab/MedCLIP-SAMv2, 'DHN-NCE Loss'); pass it as 'biomedclip:vit-b16@/path/to/pytorch_model.bin'"
)


class BiomedClipBackend(OpenClipBackend):
    """An open_clip hub model (BiomedCLIP by default): open_clip's model, tokenizer and
    preprocessing, built from local files."""

    family = "biomedclip"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, architecture: str, mean, std, repo_id: str):
        super().__init__(model, tokenizer, architecture, mean, std)
        self.repo_id = repo_id


# -- locating files in the cache ------------------------------------------------------------------


def _cached(repo_id: str, names: tuple[str, ...], why: str, fetch: str | None = None) -> Path:
    """First of ``names`` cached for ``repo_id``, else a one-line WeightsNotFoundError whose
    ``hf download`` command fetches ``fetch`` (default ``names[0]``)."""
    for name in names:
        path = hf_cached_file(repo_id, name)
        if path is not None:
            return path
    alt = f" (or {' / '.join(names[1:])})" if len(names) > 1 else ""
    raise WeightsNotFoundError(
        f"{why}: file {names[0]}{alt} of repo {repo_id} is not in the local Hugging Face cache "
        f"{hf_cache_dir()}; {_fetch_hint(repo_id, fetch or names[0])}"
    )


def hub_config(repo_id: str, with_weights: bool = True) -> tuple[Path, dict[str, Any]]:
    """``(snapshot folder, parsed open_clip_config.json)`` of an open_clip hub repo in the cache;
    when missing, the error's command also fetches the weights if ``with_weights``."""
    fetch = f"{CONFIG_NAME} {HUB_WEIGHT_NAMES[-1]}" if with_weights else CONFIG_NAME
    path = _cached(repo_id, (CONFIG_NAME,), f"open_clip model hf-hub:{repo_id}", fetch=fetch)
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not a readable open_clip_config.json ({exc}); fetch it again") from exc
    if "model_cfg" not in cfg:
        raise ConfigError(f"{path} has no 'model_cfg': not an open_clip hub model config")
    return path.parent, cfg


def local_text_cfg(repo_id: str, text_cfg: dict[str, Any]) -> tuple[dict[str, Any], Path | None]:
    """``text_cfg`` with the HF text tower pointed at its cached folder (``hf_model_name`` ->
    the snapshot holding its ``config.json``; no pretrained text weights: the CLIP checkpoint
    has them), and the cached tokenizer folder (None when the model uses open_clip's BPE)."""
    cfg = dict(text_cfg)
    model_name, tok_name = cfg.get("hf_model_name"), cfg.get("hf_tokenizer_name")
    # one command fetches both when they come from the same repo (BiomedCLIP: BiomedBERT)
    both = "config.json vocab.txt" if model_name == tok_name else None
    if model_name:
        folder = _cached(model_name, ("config.json",), f"text tower of hf-hub:{repo_id}", fetch=both).parent
        cfg["hf_model_name"] = str(folder)
        cfg["hf_model_pretrained"] = False
    tok_dir = None
    if tok_name:
        tok_dir = _cached(tok_name, TOKENIZER_FILES, f"tokenizer of hf-hub:{repo_id}", fetch=both).parent
        cfg["hf_tokenizer_name"] = str(tok_dir)
    return cfg, tok_dir


def _tokenizer(text_cfg: dict[str, Any], tok_dir: Path | None) -> Any:
    """open_clip.get_tokenizer's choice for a hub config, given the local tokenizer folder."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    ctx = text_cfg.get("context_length", open_clip.tokenizer.DEFAULT_CONTEXT_LENGTH)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if tok_dir is not None:
        return HFTokenizer(str(tok_dir), context_length=ctx, tokenizer_mode=text_cfg.get("tokenizer_mode"), **kwargs)
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx, **kwargs)


# -- checkpoints ---------------------------------------------------------------------------------

# MedCLIP-SAMv2 re-packages open_clip's BiomedCLIP as a Hugging Face model (their
# saliency_maps/model/convert.py) and releases its fine-tuned weights in that layout. These
# patterns map the re-packaged names back to open_clip's (written from the two models' module
# trees; q/k/v and the token tensors are handled in _from_hf_layout).
_HF_TO_OPEN_CLIP = [
    (r"vision_model\.embeddings\.patch_embedding\.(\w+)$", "visual.trunk.patch_embed.proj.{0}"),
    (r"vision_model\.post_layernorm\.(\w+)$", "visual.trunk.norm.{0}"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.(\w+)$", "visual.trunk.blocks.{0}.norm1.{1}"),
    (r"vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.(\w+)$", "visual.trunk.blocks.{0}.norm2.{1}"),
    (r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)$", "visual.trunk.blocks.{0}.attn.proj.{1}"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(\w+)$", "visual.trunk.blocks.{0}.mlp.{1}.{2}"),
    (r"visual_projection\.(\w+)$", "visual.head.proj.{0}"),
    (r"text_model\.embeddings\.token_embedding\.(\w+)$", "text.transformer.embeddings.word_embeddings.{0}"),
    (r"text_model\.embeddings\.position_embedding\.(\w+)$", "text.transformer.embeddings.position_embeddings.{0}"),
    (r"text_model\.embeddings\.token_type_embedding\.(\w+)$", "text.transformer.embeddings.token_type_embeddings.{0}"),
    (r"text_model\.embeddings\.layer_norm\.(\w+)$", "text.transformer.embeddings.LayerNorm.{0}"),
    (r"text_model\.encoder\.layers\.(\d+)\.self_attn\.q_proj\.(\w+)$", "text.transformer.encoder.layer.{0}.attention.self.query.{1}"),
    (r"text_model\.encoder\.layers\.(\d+)\.self_attn\.k_proj\.(\w+)$", "text.transformer.encoder.layer.{0}.attention.self.key.{1}"),
    (r"text_model\.encoder\.layers\.(\d+)\.self_attn\.v_proj\.(\w+)$", "text.transformer.encoder.layer.{0}.attention.self.value.{1}"),
    (r"text_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.(\w+)$", "text.transformer.encoder.layer.{0}.attention.output.dense.{1}"),
    (r"text_model\.encoder\.layers\.(\d+)\.layer_norm1\.(\w+)$", "text.transformer.encoder.layer.{0}.attention.output.LayerNorm.{1}"),
    (r"text_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.(\w+)$", "text.transformer.encoder.layer.{0}.intermediate.dense.{1}"),
    (r"text_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.(\w+)$", "text.transformer.encoder.layer.{0}.output.dense.{1}"),
    (r"text_model\.encoder\.layers\.(\d+)\.layer_norm2\.(\w+)$", "text.transformer.encoder.layer.{0}.output.LayerNorm.{1}"),
    (r"text_projection\.fc1\.(\w+)$", "text.proj.0.{0}"),
    (r"text_projection\.fc2\.(\w+)$", "text.proj.2.{0}"),
]


def _from_hf_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MedCLIP-SAMv2's Hugging Face layout -> open_clip names (the timm ViT keeps q, k and v
    in one ``qkv`` matrix; the class token and position table carry leading batch dims)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = re.match(r"vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(\w+)$", key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        if key == "vision_model.embeddings.class_embedding":
            out["visual.trunk.cls_token"] = value.reshape(1, 1, -1)
            continue
        if key == "vision_model.embeddings.position_embedding.weight":
            out["visual.trunk.pos_embed"] = value.unsqueeze(0)
            continue
        if key.endswith("position_ids"):  # buffers, not weights
            continue
        for pattern, target in _HF_TO_OPEN_CLIP:
            m = re.match(pattern, key)
            if m:
                out[target.format(*m.groups())] = value
                break
        else:
            out[key] = value  # logit_scale and anything already in open_clip's names
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"vision layer {layer} has only {sorted(parts)} of q/k/v {kind} in the checkpoint")
        out[f"visual.trunk.blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file -> flat state dict (open_clip names)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            # argparse.Namespace: the author's transfer scripts save their arguments next to the
            # weights; allow that one harmless class instead of unpickling arbitrary objects
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(f"cannot read BiomedCLIP checkpoint {path}: {exc}".replace("\n", " ")) from exc
    for wrapper in ("state_dict", "model"):  # open_clip_train checkpoints / the author's fork
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors; {MEDCLIP_SAMV2_HINT}")
    # DDP ("module.") and wrapper-module ("model.", which MedCLIP-SAMv2's convert.py strips)
    # prefixes; neither layout has a key of its own that starts with them
    state = {re.sub(r"^(module\.|model\.)", "", k): v for k, v in obj.items()}
    if any(k.startswith("vision_model.") for k in state):
        state = _from_hf_layout(state)
    return state


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    """Load a BiomedCLIP checkpoint file (open_clip or MedCLIP-SAMv2 layout) into ``model``, strictly."""
    from open_clip.factory import convert_state_dict, resize_pos_embed

    state = convert_state_dict(model, _read_state(path))
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    state.pop("text.transformer.embeddings.position_ids", None)  # a buffer in older transformers
    resize_pos_embed(state, model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches (another image size or width)
        raise CheckpointError(f"{path} does not fit the BiomedCLIP architecture: {exc}".replace("\n", " ")) from exc
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit the BiomedCLIP architecture: {len(missing)} missing keys "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); {MEDCLIP_SAMV2_HINT}"
        )


# -- building ------------------------------------------------------------------------------------


def create_from_hub(repo_id: str, weights: str | None, architecture: str | None = None, **kwargs) -> BiomedClipBackend:
    """Build open_clip's ``hf-hub:<repo_id>`` model from the local HF cache.

    Args:
        repo_id: the open_clip hub repo holding ``open_clip_config.json`` (and default weights).
        weights: None (the repo's own weights), ``random``, a local checkpoint file or folder, or
            another cached repo id (its config and weights replace ``repo_id``'s).
        architecture: the name recorded on the backend (default ``hf-hub:<repo_id>``).
        kwargs: passed to ``open_clip.create_model`` (e.g. ``force_image_size``).
    """
    import open_clip
    from open_clip import factory

    if not hasattr(factory, "LOCAL_DIR_PREFIX"):  # older open_clip cannot build from a folder
        raise ConfigError(f"open_clip_torch {open_clip.__version__} cannot load models from a local folder "
                          "('local-dir:'); install the version in constraints.txt (pip install -c constraints.txt open_clip_torch)")
    checkpoint: Path | None = None
    if weights and weights != "random":
        path = Path(weights).expanduser()
        if not path.exists() and _looks_like_repo_id(weights):
            repo_id, weights = weights, None  # another hub repo of the same layout
        else:
            checkpoint = resolve_weights(
                weights, what=f"BiomedCLIP ({repo_id})", how_to_get=MEDCLIP_SAMV2_HINT, filenames=FOLDER_WEIGHT_NAMES
            )
    snapshot, cfg = hub_config(repo_id, with_weights=weights is None)
    if weights is None:
        # fail early, naming the file; BiomedCLIP's repo has the .bin only
        _cached(repo_id, HUB_WEIGHT_NAMES, f"open_clip model hf-hub:{repo_id}", fetch=HUB_WEIGHT_NAMES[-1])
    text_cfg, tok_dir = local_text_cfg(repo_id, cfg["model_cfg"].get("text_cfg", {}))
    try:
        with offline():  # every path below is local
            # local-dir: is open_clip's own loader for a hub snapshot folder (config, preprocessing
            # and the weights file it prefers); only the text tower's names are replaced by folders
            model = open_clip.create_model(
                f"local-dir:{snapshot}", load_weights=weights is None, text_cfg=text_cfg, device="cpu", **kwargs
            )
            tokenizer = _tokenizer(text_cfg, tok_dir)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ConfigError(f"could not build open_clip hf-hub:{repo_id} from {snapshot}: {exc}".replace("\n", " ")) from exc
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return BiomedClipBackend(model, tokenizer, architecture or f"hf-hub:{repo_id}", mean, std, repo_id)


def create(architecture: str, weights: str | None, **kwargs) -> BiomedClipBackend:
    """Factory of the ``biomedclip`` family: ``biomedclip:vit-b16[@weights]`` (see the module doc)."""
    if architecture not in ARCHITECTURES:
        raise unknown_name("BiomedCLIP architecture", architecture, list(ARCHITECTURES))
    return create_from_hub(ARCHITECTURES[architecture], weights, architecture=architecture, **kwargs)


__all__ = ["ARCHITECTURES", "BIOMEDCLIP_REPO", "BiomedClipBackend", "create", "create_from_hub", "load_checkpoint"]
