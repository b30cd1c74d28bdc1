"""Estimated time and memory of each shipped bundle on one GPU, from FLOPs and parameter counts.

    python -m benchmarks.gpu_estimates [--tflops 100] [--json benchmarks/gpu_estimates/results.json]

Nothing here runs on a GPU: each bundle's model is built from its real architecture config with
random weights **on the meta device** (shapes only, no memory, no data), and

* ``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of one image through the model:
  forward (evaluation), forward + backward to the pixels with frozen weights (one inversion
  step), forward + backward to the trained weights (one fine-tuning image); ITM models (ViLT)
  count one image-text pair;
* ``torch.autograd.graph.saved_tensors_hooks`` adds up the bytes autograd keeps for the
  backward of one inversion image (activation memory; counted in fp32, bf16 roughly halves it);
* the bundle's config gives the workload: inverted images x steps, fine-tuning runs x epochs x
  images (the CXR sweep fine-tunes once per lr multiplier, per concept in ``separate`` mode).

Time = FLOPs / ``--tflops`` (default 100 TFLOP/s: about 10 % of an H100's dense bf16 peak, a
cautious figure for the small batches of inversion; scale the column for another rate), every
step at the model's input size (progressive ``resolutions`` make the early steps cheaper).
Memory = fp32 weights + activations of one inversion chunk (all images at once unless
``inversion#chunk_size``) or, for fine-tuning, weights + gradients + Adam states of the trained
encoder + the activations of one batch. Evaluation is given per 1,000 images (per 1,000
image-text pairs for ITM scoring) because it depends on the dataset you point the bundle at.
These are **estimates**, not measurements: README "Running on GPUs" shows them as such.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30


@contextlib.contextmanager
def _open_clip_on_meta():
    """open_clip builds on the CPU and moves there; on meta the move must stay on meta."""
    import open_clip

    original = open_clip.create_model

    def create_model(*args: Any, **kw: Any):
        kw["device"] = "meta"
        return original(*args, **kw)

    open_clip.create_model = create_model
    try:
        yield
    finally:
        open_clip.create_model = original


def build_on_meta(spec: str):
    """The backend of ``spec`` (``@random`` weights) with every tensor on the meta device (ViLT: CPU)."""
    from medkt.backends import BackendSpec, create_backend

    parsed = BackendSpec.parse(spec)
    random_spec = f"{parsed.family}:{parsed.architecture}@random"
    options: dict[str, Any] = {}
    if parsed.family == "vilt":
        # the tokenizer only sets token ids: the tiny vocabulary will do. ViLT reads image sizes
        # back to the host (.item()), which a meta tensor cannot: it is built and run on the CPU
        # (87 M parameters, one image: seconds)
        from medkt.backends.vilt import _tiny_vocab_dir

        options["tokenizer"] = str(_tiny_vocab_dir())
        return create_backend(random_spec, device="cpu", **options)
    with torch.device("meta"), _open_clip_on_meta():
        return create_backend(random_spec, device="meta", **options)


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators run (about one GPU kernel launch each in eager mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> tuple[int, int]:
    """(FLOPs, aten operators) of ``fn()``."""
    with FlopCounterMode(display=False) as mode, _OpCounter() as ops:
        fn()
    return int(mode.get_total_flops()), ops.ops


def model_costs(spec: str) -> dict[str, Any]:
    """FLOPs per image (forward / inversion step / fine-tuning) and memory figures of one model."""
    b = build_on_meta(spec)
    size = int(b.image_size)
    itm = bool(getattr(b, "supports_itm", False)) and not getattr(b, "has_embeddings", True)
    params = sum(p.numel() for p in b.parameters())
    visual = sum(p.numel() for p in b.visual_parameters())
    text = ["a photo of a perfectly round opening cut through a garden wall of pale stone."]

    def score(x: torch.Tensor) -> torch.Tensor:
        if itm:
            return b.itm_logits(x, b.tokenize(text * x.shape[0]))
        return b.encode_image(x)

    for p in b.parameters():
        p.requires_grad_(False)
    x = torch.rand(1, int(b.image_channels), size, size, device=b.device)
    fwd, fwd_ops = _count(lambda: score(x))
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    def inversion_step() -> None:
        xg = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = score(xg)
        out.float().sum().backward()

    inv, inv_ops = _count(inversion_step)
    activation_bytes = sum(saved)
    for p in b.visual_parameters():
        p.requires_grad_(True)
    train, train_ops = _count(lambda: score(x).float().sum().backward())
    return {"spec": spec, "image_size": size, "itm": itm, "params": params, "visual_params": visual,
            "flops_forward": fwd, "flops_inversion_step": inv, "flops_finetune_image": train,
            "activation_bytes_per_image": activation_bytes, "ops_forward": fwd_ops, "ops_inversion_step": inv_ops,
            "ops_finetune_step": train_ops}


def _bundle_config(path: Path) -> dict[str, Any]:
    from medkt.preflight import BundleConfig, load_config

    return {"cfg": BundleConfig(load_config([str(path)]))}


def workload(config: Path) -> dict[str, Any]:
    """Inverted images x steps and fine-tuning images of a bundle config (see the module docstring)."""
    from medkt.preflight import UNKNOWN

    import medkt.bundles  # noqa: F401 - loaded so the bundles' "$medkt..." expressions resolve
    import medkt.natural.classnames  # noqa: F401

    cfg = _bundle_config(config)["cfg"]

    def arg(name: str, default: Any = None) -> Any:
        v = cfg.get(f"pipeline#{name}", default=default)
        return default if v is UNKNOWN else v

    concepts = arg("concepts", []) or []
    concepts = concepts if isinstance(concepts, list) else []
    n_images = sum(int(c.get("n_images", 10)) for c in concepts if isinstance(c, dict))
    if not concepts:  # zero-shot only, or a pipeline with its own recipe format (phantom): not modelled
        return {"inverted_images": None, "backend": arg("backend")}
    inversion = arg("inversion", {}) or {}
    finetune = arg("finetune", {}) or {}
    steps = int(inversion.get("steps", 5000)) if isinstance(inversion, dict) else 5000
    chunk = inversion.get("chunk_size") if isinstance(inversion, dict) else None
    runs = len(arg("multipliers", [1]) or [1])
    if arg("mode") == "separate" or arg("separate_concepts") is True:
        runs *= max(1, len(concepts))
    epochs = int(finetune.get("epochs", 1)) if isinstance(finetune, dict) else 1
    batch = int(finetune.get("batch_size", 4)) if isinstance(finetune, dict) else 4
    held_out = arg("evaluations", {}) or {}
    for spec in held_out.values() if isinstance(held_out, dict) else []:
        if isinstance(spec, dict) and spec.get("source") == "inversion":
            n_images += int(spec.get("n_images", 5)) * max(1, len(concepts))
    if "images" in (cfg.doc.get("pipeline") or {}) and arg("images") == "noise":
        steps = 0  # implicit transfer: no inversion
    return {"inverted_images": n_images, "steps": steps, "chunk_size": chunk, "finetune_runs": runs,
            "finetune_images": n_images * epochs * runs, "batch_size": batch,
            "backend": arg("backend")}


def estimate(costs: dict[str, Any], work: dict[str, Any], tflops: float, op_us: float) -> dict[str, Any]:
    """Seconds and GiB of a bundle's workload (see the module docstring for the model)."""
    if work["inverted_images"] is None:
        return {}
    rate, op_s = tflops * 1e12, op_us * 1e-6
    chunk = work["chunk_size"] or work["inverted_images"]
    n_chunks = -(-work["inverted_images"] // chunk)
    # every step of a chunk: its images' FLOPs + one launch per operator (independent of the batch)
    inv_s = work["steps"] * (work["inverted_images"] * costs["flops_inversion_step"] / rate
                             + n_chunks * costs["ops_inversion_step"] * op_s)
    ft_steps = -(-work["finetune_images"] // work["batch_size"])
    ft_s = work["finetune_images"] * costs["flops_finetune_image"] / rate + ft_steps * costs["ops_finetune_step"] * op_s
    batches = -(-1000 // 64)  # evaluation batches of 64
    eval_s = 1000 * costs["flops_forward"] / rate + batches * costs["ops_forward"] * op_s
    weights = 4 * costs["params"]
    inv_mem = weights + chunk * costs["activation_bytes_per_image"]
    # Adam: fp32 gradient + two moments of the trained (visual) weights; a batch's activations
    ft_mem = weights + 12 * costs["visual_params"] + work["batch_size"] * costs["activation_bytes_per_image"]
    return {"inversion_s": inv_s, "finetune_s": ft_s, "eval_s_per_1000": eval_s,
            "inversion_mem_gib": inv_mem / GIB, "finetune_mem_gib": ft_mem / GIB}


def _t(s: float) -> str:
    if s < 0.05:
        return "< 0.1 s"
    if s < 10:
        return f"{s:.1f} s"
    return f"{s:.0f} s" if s < 120 else (f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tflops", type=float, default=100.0, help="achieved TFLOP/s assumed (default 100)")
    ap.add_argument("--op-us", type=float, default=10.0,
                    help="launch + dispatch overhead per operator in microseconds (default 10)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from medkt.bundles import list_bundles

    models: dict[str, dict[str, Any]] = {}
    rows = []
    for b in list_bundles():
        work = workload(b.path / "configs" / "transfer.json")
        spec = work["backend"]
        if not isinstance(spec, str):
            continue
        key = spec.split("@")[0]
        if key not in models:
            models[key] = model_costs(spec)
            m = models[key]
            print(f"# {key}: {m['params'] / 1e6:.1f} M params ({m['visual_params'] / 1e6:.1f} M visual), "
                  f"{m['image_size']} px; GFLOPs/image: forward {m['flops_forward'] / 1e9:.2f}, inversion step "
                  f"{m['flops_inversion_step'] / 1e9:.2f}, fine-tuning {m['flops_finetune_image'] / 1e9:.2f}; "
                  f"operators per inversion step {m['ops_inversion_step']}; activations "
                  f"{m['activation_bytes_per_image'] / 2**20:.0f} MiB/image", file=sys.stderr)
        rows.append({"bundle": b.name, "model": key, **work, **estimate(models[key], work, args.tflops, args.op_us)})
    print("| bundle | model | inverted images x steps | inversion | fine-tuning | evaluation per 1,000 images "
          "| peak memory: inversion / fine-tuning |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["inverted_images"] is None:
            print(f"| {r['bundle']} | `{r['model']}` | not modelled | | | | |")
            continue
        runs = r["finetune_runs"]
        print(f"| {r['bundle']} | `{r['model']}` | {r['inverted_images']} x {r['steps']} | {_t(r['inversion_s'])} | "
              f"{_t(r['finetune_s'])} ({runs} run{'s' if runs > 1 else ''}) | {_t(r['eval_s_per_1000'])}"
              f"{' (pairs)' if models[r['model']]['itm'] else ''} | "
              f"{r['inversion_mem_gib']:.1f} / {r['finetune_mem_gib']:.1f} GiB |")
    if args.json:
        args.json.write_text(json.dumps({"tflops": args.tflops, "op_us": args.op_us, "models": models,
                                         "bundles": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
