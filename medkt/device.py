"""Where a model runs and in which precision: ``--device`` and ``--precision`` of every command.

* `resolve_device` turns a user string (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``;
  ``meta`` for tests) into a ``torch.device``; an unavailable device is a `ConfigError`
  that lists what this machine has.
* `resolve_precision` turns ``auto|fp32|bf16|fp16`` into the precision used on a device:
  ``auto`` is bf16 on CUDA GPUs that support it and fp32 everywhere else.
* `autocast` runs a block in that precision (``torch.autocast``; fp32 is a no-op, so CPU
  runs in fp32 are bit-for-bit what they were without it) and `grad_scaler` gives the
  loss scaler fp16 training needs (disabled for fp32/bf16, whose range needs none).

Parameters and optimiser state stay fp32 under autocast (mixed precision), and so do the
optimised pixels of inversion: only the forward passes run in the low precision.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from medkt.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI imports this module for its help texts
    import torch

#: values of ``--precision``
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: autocast dtype name of each resolved precision (fp32: no autocast)
_DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}
DEVICE_HELP = "auto (CUDA when available, else CPU) | cpu | cuda | cuda:N | mps"
PRECISION_HELP = "auto (bf16 on GPUs that support it, else fp32) | fp32 | bf16 | fp16 (CUDA only)"


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def available_devices() -> list[str]:
    """The device strings this machine can run on, e.g. ``["cpu", "cuda:0", "cuda:1"]``."""
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        out.append("mps")
    return out


_DEVICE_TYPES = ("auto", "cpu", "cuda", "mps", "meta")


def check_device_spec(spec: str | None) -> str:
    """The normalised text of a ``--device`` value, checked for its form only (no torch import:
    the preflight of `medkt.preflight` calls it); whether this machine has the device is
    decided later by `resolve_device`.

    Raises:
        ConfigError: not one of ``auto|cpu|cuda|cuda:N|mps|meta``.
    """
    text = "auto" if spec is None else str(spec).strip().lower()
    kind, sep, index = text.partition(":")
    if kind not in _DEVICE_TYPES or (sep and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"unknown device {spec!r}: use {DEVICE_HELP}", key="device")
    return text


def check_precision_spec(precision: str | None, device: str | None = None) -> str:
    """``precision`` normalised to one of `PRECISIONS` (aliases such as ``half`` accepted),
    without importing torch; an explicit ``cpu``/``meta`` ``device`` also refuses what cannot run
    there (fp16 on the CPU, anything but fp32 on meta). Whether a GPU supports bf16 is decided
    later by `resolve_precision`."""
    p = "auto" if precision is None else str(precision).strip().lower()
    p = _PRECISION_ALIASES.get(p, p)
    if p not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use {PRECISION_HELP}", key="precision")
    dev = None if device is None else str(device).strip().lower()
    if p in ("bf16", "fp16") and dev == "meta":
        raise ConfigError(f"precision {p!r} cannot run on the meta device (torch.autocast has no meta backend); "
                          "use fp32", key="precision")
    if p == "fp16" and dev == "cpu":
        raise ConfigError("precision 'fp16' is only supported on CUDA (and MPS) devices: CPU autocast has no "
                          "fp16 loss scaling; use --precision bf16 (or fp32) on the CPU", key="precision")
    return p


_PRECISION_ALIASES = {"float32": "fp32", "32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
                      "16": "fp16"}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` / ``"cpu"`` / ``"cuda"`` / ``"cuda:N"`` / ``"mps"`` / ``"meta"`` -> ``torch.device``.

    ``auto`` (and None) is the current CUDA device when CUDA is available, else the CPU.
    ``cuda`` without an index is the current CUDA device (``cuda:LOCAL_RANK`` under torchrun once
    `medkt.distributed.init_from_env` has set it).

    Raises:
        ConfigError: a malformed spec or a device this machine does not have (the message lists
            the available ones).
    """
    import torch

    if isinstance(spec, torch.device):
        text = str(spec)
    else:
        text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}: use {DEVICE_HELP}") from None
    hint = f"available here: {', '.join(available_devices())}; pick one with --device (or device=... in a bundle)"
    if dev.type in ("cpu", "meta"):
        return torch.device(dev.type)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {text!r} requested but CUDA is not available on this machine "
                              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); {hint}")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {text!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                              f"device(s); {hint}")
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not _mps_available():
            raise ConfigError(f"device 'mps' requested but Apple MPS is not available; {hint}")
        return torch.device("mps")
    raise ConfigError(f"unsupported device {text!r}: use {DEVICE_HELP}")


def _bf16_supported(device: torch.device) -> bool:
    import torch

    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type in ("cpu", "mps")


def resolve_precision(precision: str | None = "auto", device: str | torch.device | None = "cpu") -> str:
    """``auto|fp32|bf16|fp16`` -> the precision used on ``device`` (``"fp32"``, ``"bf16"`` or ``"fp16"``).

    ``auto`` is bf16 on CUDA devices that support it (Ampere and newer) and fp32 otherwise (CPU
    included: bf16 on a CPU is slower there unless it has AMX and changes results). fp16 needs a
    loss scaler and is offered on CUDA (and MPS) only; on the CPU it is refused with a pointer
    to bf16.
    """
    import torch

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    p = check_precision_spec(precision, dev.type if dev.type in ("cpu", "meta") else None)
    if p == "auto":
        return "bf16" if dev.type == "cuda" and _bf16_supported(dev) else "fp32"
    if p == "fp32":
        return p
    if p == "bf16" and not _bf16_supported(dev):
        raise ConfigError(f"device {dev} does not support bf16 (e.g. a pre-Ampere GPU); use --precision fp16 "
                          "or fp32")
    return p


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (None for fp32)."""
    import torch

    if precision not in _DTYPES:
        raise ConfigError(f"precision must be one of {list(_DTYPES)} here, got {precision!r}")
    name = _DTYPES[precision]
    return None if name is None else getattr(torch, name)


@contextlib.contextmanager
def autocast(device: str | torch.device, precision: str = "fp32") -> Iterator[None]:
    """Run the block's forward passes in ``precision`` on ``device`` (no-op for fp32).

    Outside the block nothing changes: parameters, gradients and optimiser state stay fp32.
    """
    import torch

    dtype = autocast_dtype(precision)
    if dtype is None:
        yield
        return
    dev = device if isinstance(device, torch.device) else torch.device(device)
    with torch.autocast(device_type=dev.type, dtype=dtype):
        yield


def grad_scaler(device: str | torch.device, precision: str = "fp32") -> torch.amp.GradScaler:
    """A loss scaler for fp16 training; disabled (a pass-through) for fp32 and bf16.

    Use it the standard way: ``scaler.scale(loss).backward()``, ``scaler.unscale_(opt)`` before
    clipping, ``scaler.step(opt)``, ``scaler.update()``.
    """
    import torch

    dev = device if isinstance(device, torch.device) else torch.device(device)
    enabled = precision == "fp16"
    # a disabled scaler never touches the device (and so also works on cpu/meta)
    return torch.amp.GradScaler(dev.type if enabled else "cpu", enabled=enabled)


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of the first parameter (or buffer) of ``module``; CPU for a module without tensors."""
    import torch

    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


__all__ = ["PRECISIONS", "DEVICE_HELP", "PRECISION_HELP", "available_devices", "check_device_spec",
           "check_precision_spec", "resolve_device",
           "resolve_precision", "autocast", "autocast_dtype", "grad_scaler", "module_device"]
