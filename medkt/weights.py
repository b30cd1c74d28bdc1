"""Resolving local weights: a file, a folder, a repo in the local Hugging Face cache, or an
open_clip pretrained tag whose file is in that cache.

medkt never downloads and never opens a network connection: every lookup here reads the local
cache layout only (``models--ORG--NAME/refs/<revision>`` -> ``snapshots/<commit>/<file>``, the
layout ``huggingface_hub`` writes), and the models are then built from local paths. A missing
file raises `WeightsNotFoundError` naming the file and how to get it (README, section
"Getting weights").

Why not rely on ``HF_HUB_OFFLINE``: ``huggingface_hub`` reads it once, at import time, so setting
it inside medkt after ``open_clip``/``transformers`` were imported changes nothing (the hub then
retries for about a minute before failing).
"""
from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medkt.errors import ConfigError, MedktError, UnknownNameError, WeightsNotFoundError, did_you_mean, unknown_name

WEIGHTS_ENV = "MEDKT_WEIGHTS"
README_HINT = "see README.md, section 'Getting weights'"


@dataclass(frozen=True)
class BackendSpec:
    """A parsed backend spec ``family:architecture[@weights]``.

    ``family`` is the registered adapter name, ``architecture`` the model shape, ``weights`` a local
    path, an HF-cache repo id, ``random``, or ``None`` for the family's default.
    """

    family: str
    architecture: str
    weights: str | None

    @classmethod
    def parse(cls, spec: str) -> "BackendSpec":
        """``"clip:ViT-B-32@/path"`` -> ``BackendSpec("clip", "ViT-B-32", "/path")``."""
        if not isinstance(spec, str) or ":" not in spec:
            raise ConfigError(
                f"bad backend spec {spec!r}: expected 'family:architecture[@weights]', "
                "e.g. 'clip:ViT-B-32@/models/clip-b32.pt' or 'hf_clip:tiny@random'"
            )
        family, rest = spec.split(":", 1)
        arch, _, weights = rest.partition("@")
        if not family or not arch:
            raise ConfigError(f"bad backend spec {spec!r}: family and architecture must be non-empty")
        return cls(family.strip(), arch.strip(), weights.strip() or None)

    def __str__(self) -> str:
        return f"{self.family}:{self.architecture}" + (f"@{self.weights}" if self.weights else "")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache folder, read from the environment *now* (not at import time):
    ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub`` (default ``~/.cache/huggingface/hub``), as huggingface_hub."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
    )
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def _repo_folder(repo_id: str) -> Path:
    return hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))


def hf_cache_snapshot(repo_id: str, revision: str = "main") -> Path | None:
    """Snapshot folder of ``repo_id`` that ``refs/<revision>`` points to in the local HF cache, or
    None. ``revision`` may also be a commit hash. Purely local (no network)."""
    repo = _repo_folder(repo_id)
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snap = repo / "snapshots" / commit
    return snap if commit and snap.is_dir() else None


def hf_cached_file(repo_id: str, filename: str, revision: str = "main") -> Path | None:
    """Local path of ``filename`` of ``repo_id`` at ``revision`` in the HF cache, or None.

    ``huggingface_hub.try_to_load_from_cache`` follows ``refs/<revision>`` and never touches the
    network; the cache folder is passed explicitly because the library's default is frozen at import.
    """
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()), revision=revision)
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def _fetch_hint(repo_id: str, filename: str | None = None) -> str:
    what = f"{repo_id} {filename}" if filename else repo_id
    return (f"on a machine with internet run `hf download {what}` (huggingface_hub's CLI) and copy "
            f"the cache folder models--{repo_id.replace('/', '--')} into {hf_cache_dir()} ({README_HINT})")


def _url_cache_file(url: str) -> Path | None:
    """The file open_clip's URL download would have left in its cache (``~/.cache/clip``)."""
    path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url) if url else None
    return path if path is not None and path.is_file() else None


def open_clip_tag_checkpoint(architecture: str, tag: str) -> Path:
    """Local checkpoint file of an open_clip pretrained tag (e.g. ``ViT-B-32`` + ``openai``).

    The tag is looked up in open_clip's own registry (`open_clip.get_pretrained_cfg`); its
    ``hf_hub`` entry (``org/name/[file]``) is searched in the local HF cache, preferring
    safetensors as open_clip does; a URL-only tag in open_clip's URL cache (``~/.cache/clip``).

    Raises:
        UnknownNameError: not a tag of this architecture.
        WeightsNotFoundError: the file is not cached; the message names it and how to fetch it.
    """
    import open_clip
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    cfg = open_clip.get_pretrained_cfg(architecture, tag)
    if not cfg:
        raise unknown_name(f"open_clip pretrained tag of {architecture}", tag,
                           open_clip.list_pretrained_tags_by_model(architecture))
    if cfg.get("file"):
        return Path(cfg["file"])
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        # the same candidates, in the same order, as open_clip.pretrained.download_pretrained_from_hf
        if not filename:
            names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
        elif filename.endswith((".bin", ".pth")):
            names = [filename[:-4] + ".safetensors", filename]
        else:
            names = [filename]
        for name in names:
            path = hf_cached_file(repo_id, name)
            if path is not None:
                return path
        legacy = _url_cache_file(cfg.get("url", ""))
        if legacy is not None:
            return legacy
        raise WeightsNotFoundError(
            f"open_clip weights {architecture}@{tag} are not in the local Hugging Face cache {hf_cache_dir()}: "
            f"fetch file {names[0]} (or {names[-1]}) of repo {repo_id}; {_fetch_hint(repo_id, names[0])}"
        )
    url = cfg.get("url", "")
    if url:
        path = _url_cache_file(url)
        if path is not None:
            return path
        raise WeightsNotFoundError(
            f"open_clip weights {architecture}@{tag} are not cached: fetch {url} on a machine with internet "
            f"and pass the file as '@/path/to/{os.path.basename(url)}' ({README_HINT})"
        )
    raise ConfigError(f"open_clip tag {architecture}@{tag} names no file, repo or URL")


def open_clip_tag_options(architecture: str, tag: str) -> dict:
    """``open_clip.create_model`` keywords that a pretrained tag implies beyond its file: the tag's
    preprocessing (mean/std/interpolation/resize mode) and QuickGELU for OpenAI-trained weights."""
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    cfg = open_clip.get_pretrained_cfg(architecture, tag) or {}
    return {
        "force_preprocess_cfg": merge_preprocess_dict({}, cfg),
        "force_quick_gelu": bool(cfg.get("quick_gelu", False)),
    }


@contextmanager
def offline():
    """Belt and braces around library calls that are given local paths only: hub access fails
    fast. Sets the environment switches (for code that reads them later) *and* the already
    imported ``huggingface_hub.constants.HF_HUB_OFFLINE``, which is what the hub consults."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old_env = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers and open_clip depend on it
        constants = None
    old_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if constants is not None:
            constants.HF_HUB_OFFLINE = old_const
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


@contextmanager
def quiet_random_init_notice() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning.

    For callers that build with ``pretrained=None`` and load the weights themselves right after
    (the notice would be a false alarm). open_clip logs it with ``logging.warning``, i.e. on the
    root logger, whose filters run before any handler.
    """
    root = logging.getLogger()
    notice = _DropRandomInitNotice()
    root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def weights_file_kind(path: str | os.PathLike) -> str:
    """What a weights file is, from its content (the suffix only for safetensors, as open_clip):

    ``"torchscript"`` (a ``torch.jit.save`` archive, e.g. OpenAI's CLIP release files),
    ``"torch"`` (a ``torch.save`` file), ``"safetensors"``, or ``"zip"`` (a zip archive that is
    neither, e.g. a release zip that must be unzipped first). Both torch formats are zip files;
    they differ by the records torch itself checks (``constants.pkl`` for TorchScript, ``data.pkl``
    for ``torch.save``). Anything else (legacy pickles, truncated files) is ``"torch"``: torch.load
    then reports it.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return "safetensors"
    if not zipfile.is_zipfile(path):
        return "torch"
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    if any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in names):
        return "torchscript"
    if any(n.rsplit("/", 1)[-1] == "data.pkl" for n in names):
        return "torch"
    return "zip"


def zip_archive_error(path: str | os.PathLike, unzip_hint: str) -> ConfigError:
    """The error for a zip archive given where a checkpoint was expected; names a few of its files."""
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return ConfigError(f"{path} is a zip archive (holding {shown or 'nothing'}), not a checkpoint: unzip it and "
                       f"{unzip_hint} ({README_HINT})")


def resolve_open_clip_weights(architecture: str, weights: str | None, *, what: str, how_to_get: str,
                              filenames: tuple[str, ...] = ()) -> tuple[Path, bool]:
    """Local file of an open_clip model: ``(path, is_tag)``.

    ``weights`` is an open_clip pretrained tag of ``architecture`` (its file in the local caches,
    `open_clip_tag_checkpoint`), or a path / HF-cache repo id / ``None`` as in
    `resolve_weights`. A bare word that is neither a tag nor an existing path (``opena``)
    raises `UnknownNameError` with the closest tag.
    """
    import open_clip

    if weights is not None and open_clip.is_pretrained_cfg(architecture, weights):
        return open_clip_tag_checkpoint(architecture, weights), True
    if weights is not None and not Path(weights).expanduser().exists() and not any(c in weights for c in "/\\.~"):
        tags = open_clip.list_pretrained_tags_by_model(architecture)
        raise UnknownNameError(
            f"weights {weights!r} of {what} are neither a local file nor a pretrained tag of {architecture}."
            f"{did_you_mean(weights, tags)} Known tags: {', '.join(sorted(tags)) or '(none)'}; or pass a file "
            f"path after '@' ({README_HINT})"
        )
    return resolve_weights(weights, what=what, how_to_get=how_to_get, filenames=filenames), False


def _looks_like_repo_id(weights: str) -> bool:
    return "/" in weights and not weights.startswith((".", "/", "~")) and weights.count("/") == 1


def resolve_weights(weights: str | None, *, what: str, how_to_get: str, filenames: tuple[str, ...] = ()) -> Path:
    """Find local weights.

    Args:
        weights: a path (file or folder), an HF repo id present in the local cache (the snapshot
            ``refs/main`` points to), or None to use ``$MEDKT_WEIGHTS``.
        what: human name of the model, for the error message.
        how_to_get: one sentence on where to download the file and where to put it.
        filenames: when ``weights`` is a folder, the first of these that exists inside is returned
            (the folder itself when empty).
    """
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV)
        if not weights:
            raise WeightsNotFoundError(
                f"no weights given for {what}; pass '@/path/to/weights' in the backend spec "
                f"(or --set backend=...) or set {WEIGHTS_ENV}. {how_to_get} ({README_HINT})"
            )
    path = Path(weights).expanduser()
    if not path.exists() and _looks_like_repo_id(weights):
        snap = hf_cache_snapshot(weights)
        if snap is None:
            raise WeightsNotFoundError(
                f"weights for {what}: {weights} is neither a local path nor a repo in the local Hugging Face "
                f"cache {hf_cache_dir()}; {_fetch_hint(weights)}. {how_to_get}"
            )
        path = snap
    if not path.exists():
        raise WeightsNotFoundError(
            f"weights not found for {what}: {weights}. {how_to_get} ({README_HINT})"
        )
    if path.is_dir() and filenames:
        for name in filenames:
            if (path / name).exists():
                return path / name
        raise WeightsNotFoundError(
            f"weights folder {path} for {what} holds none of {', '.join(filenames)}. {how_to_get} ({README_HINT})"
        )
    return path
# --- what can be checked of a backend spec without building the model (preflight) ----------------
#: ``biomedclip:ARCH`` -> its open_clip hub repo (read by `medkt.backends.biomedclip`)
BIOMEDCLIP_REPOS = {"vit-b16": "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"}
#: weight files of an open_clip hub repo, in open_clip's order of preference
OPEN_CLIP_HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def hub_model_problems(repo_id: str) -> list[MedktError]:
    """Files an open_clip hub model (``hf-hub:repo_id``, e.g. BiomedCLIP) needs from the local HF
    cache that are not there: its ``open_clip_config.json`` and weights, and the ``config.json``
    and tokenizer vocabulary of the HF text tower its config names. Path checks only (no torch)."""
    import json

    def cached(repo: str, names: tuple[str, ...]) -> Path | None:
        snap = hf_cache_snapshot(repo)
        return next((snap / n for n in names if snap is not None and (snap / n).is_file()), None)

    out: list[MedktError] = []
    config = cached(repo_id, ("open_clip_config.json",))
    if config is None or cached(repo_id, OPEN_CLIP_HUB_WEIGHTS) is None:
        missing = " ".join(n for n, ok in (("open_clip_config.json", config), (OPEN_CLIP_HUB_WEIGHTS[-1],
                           cached(repo_id, OPEN_CLIP_HUB_WEIGHTS))) if ok is None)
        out.append(WeightsNotFoundError(f"open_clip model hf-hub:{repo_id} is not in the local HF cache "
                                        f"({missing}); {_fetch_hint(repo_id, missing)}"))
    if config is None:
        return out
    try:
        text = json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {}).get("text_cfg", {})
    except (OSError, ValueError, AttributeError):
        return out  # the builder reports an unreadable config with its own message
    missing: dict[str, list[str]] = {}  # text-tower repo -> files it lacks (one line per repo)
    for repo, names in ((text.get("hf_model_name"), ("config.json",)),
                        (text.get("hf_tokenizer_name"), ("vocab.txt", "tokenizer.json"))):
        if isinstance(repo, str) and not Path(repo).is_dir() and cached(repo, names) is None:
            missing.setdefault(repo, []).append(names[0])
    for repo, names in missing.items():
        files = " ".join(names)
        out.append(WeightsNotFoundError(f"{files} of {repo} (text tower of hf-hub:{repo_id}) not in the local HF "
                                        f"cache; {_fetch_hint(repo, files)}"))
    return out


#: families whose spec without ``@weights`` means ``$MEDKT_WEIGHTS`` (see each backend's ``create``)
_ENV_DEFAULT_FAMILIES = ("medclip", "clip", "open_clip", "coca", "vilt")
#: families whose ``@weights`` may be an open_clip pretrained tag (not decidable without open_clip)
_TAG_FAMILIES = ("clip", "open_clip", "coca")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.endswith(_WEIGHT_SUFFIXES)


def backend_problems(spec: str, options: Mapping[str, Any] | None = None) -> list[MedktError]:
    """Problems with a backend spec's weights and ``tokenizer`` option that can be seen without
    building the model (see the module docstring for what is and is not checked)."""
    try:
        parsed = BackendSpec.parse(spec)
    except ConfigError as exc:
        return [exc]
    out: list[MedktError] = []
    weights, family = parsed.weights, parsed.family
    how = "The bundle's docs/README.md names the weights it needs."
    hub = (BIOMEDCLIP_REPOS.get(parsed.architecture) if family == "biomedclip"
           else parsed.architecture[len("hf-hub:"):] if family in ("clip", "open_clip") and
           parsed.architecture.startswith("hf-hub:") else None)
    if hub and (weights is None or not _looks_like_path(weights)) and weights != "random":
        out += hub_model_problems(weights if weights and _looks_like_repo_id(weights) else hub)
        weights = "random"  # nothing else to look for
    if weights is None:
        if family == "hf_clip" and parsed.architecture != "tiny":
            weights = parsed.architecture  # hf_clip:ORG/NAME: the architecture is the repo
        elif family not in _ENV_DEFAULT_FAMILIES or (family == "vilt" and parsed.architecture == "tiny"):
            weights = "random"  # the family's shipped default (phantom) or a test model
    if weights == "random":
        pass
    elif weights is not None and _looks_like_path(weights):
        if not Path(weights).expanduser().exists():
            out.append(WeightsNotFoundError(f"weights not found: {Path(weights).expanduser()} (backend {spec}); fix "
                                            f"the path after '@' ({README_HINT})"))
    elif weights is not None and family in _TAG_FAMILIES and not _looks_like_repo_id(weights):
        pass  # an open_clip tag or a typo: only open_clip's registry knows (checked when the model is built)
    else:
        try:
            resolve_weights(weights, what=f"backend {spec}", how_to_get=how)
        except WeightsNotFoundError as exc:
            out.append(exc)
    tokenizer = (options or {}).get("tokenizer")
    if isinstance(tokenizer, (str, os.PathLike)):
        try:
            resolve_weights(str(tokenizer), what=f"the tokenizer of backend {spec} (backend_options#tokenizer)",
                            how_to_get="fix backend_options#tokenizer (a folder or a repo in the local HF cache)")
        except WeightsNotFoundError as exc:
            out.append(exc)
    return out


