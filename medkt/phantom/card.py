"""MODEL_CARD.md for a PhantomCLIP checkpoint, written from its sidecar JSON (measured values only)."""
from __future__ import annotations

import json
from pathlib import Path


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * float(v):.1f}"


def write_model_card(checkpoint: Path, out: Path) -> Path:
    """Write ``MODEL_CARD.md`` for a pretrained phantom checkpoint from its side-car JSON (what it saw,
    held-out findings, zero-shot results) to ``out``."""
    side = json.loads(Path(checkpoint).with_suffix(".json").read_text())
    cfg = side["pretrain_config"]
    zs = side["zero_shot"]
    mcfg = side["config"]
    size_mb = Path(checkpoint).stat().st_size / 1e6
    lines = [
        "# PhantomCLIP (medkt phantom world)",
        "",
        "A small CLIP-style model pretrained by medkt on its procedurally generated chest X-ray phantoms "
        "(`medkt.phantom`). It exists so that knowledge transfer can be demonstrated offline: the finding(s) "
        f"**{', '.join(side['held_out'])}** never appear in an image during pretraining and are taught later "
        "from text alone (bundle `phantom_nodules`).",
        "",
        "## What it saw",
        f"- Images: {cfg['n_per_class']} phantoms per known finding ({len(side['known_findings'])} findings: "
        f"{', '.join(side['known_findings'])}), {cfg['image_size']}x{cfg['image_size']} grayscale, data seed "
        f"{cfg['data_seed']}; {cfg['captions_per_image']} captions per image mixing the finding name and an "
        "attribute description generated from what was drawn (size, shape, margin, brightness, count, location).",
        f"- Text only (no images): a glossary of {cfg['glossary_per_finding']} (name sentence, definition or "
        "description) pairs per finding **including the held-out finding(s)**, aligned by a text-text "
        "contrastive loss (weight "
        f"{cfg['glossary_weight']}). This plays the role of the language knowledge a real VLM text encoder has: "
        "the text tower knows what the word *nodule* means, the image tower has never seen one.",
        "- Never: any image of a held-out finding.",
        "",
        "## Architecture",
        f"- Image tower: residual CNN, widths {mcfg['widths']}, blocks {mcfg['blocks']}, GroupNorm + SiLU, "
        f"avg+max pooling, embedding {mcfg['embed_dim']}.",
        f"- Text tower: open_clip's bundled BPE tokenizer (any English text), token table {mcfg['vocab_size']}x"
        f"{mcfg['token_dim']}, {mcfg['text_layers']}-layer transformer width {mcfg['text_width']}, "
        f"context {mcfg['context_length']}, end-of-text pooling.",
        f"- Learned temperature. Weights stored as float16 safetensors ({size_mb:.1f} MB), loaded as float32.",
        "",
        "## Training",
        f"- {cfg['steps']} steps, batch {cfg['batch_size']}, AdamW lr {cfg['lr']} (warm-up {cfg['warmup']}, cosine), "
        f"weight decay {cfg['weight_decay']}, SparseAdam for the token table; seed {cfg['seed']}.",
        f"- Robustness for perceptually aligned gradients: FGSM adversarial examples (random start, L-inf "
        f"{cfg['adv_eps'] * 255:.1f}/255) on {int(100 * cfg['adv_fraction'])}% of each batch; Gaussian noise "
        f"sigma <= {cfg['noise_std']}, blur p={cfg['blur_p']}, small affine jitter.",
        "- Multi-positive InfoNCE (identical captions are not negatives of each other).",
        f"- Wall time: {side['seconds_total'] / 60:.1f} min total ({side['seconds_train'] / 60:.1f} min of "
        f"optimisation, {side['seconds_data']:.0f} s data generation) on {side['machine']}, "
        f"{side['threads']} thread(s), torch {side['torch']}.",
        "- Reproduce: `python -m medkt.phantom.pretrain --config medkt/assets/phantom/pretrain_config.json "
        "--out medkt/assets/phantom/phantom_clip.safetensors --model-card medkt/assets/phantom/MODEL_CARD.md`.",
        "",
        f"## Zero-shot accuracy (fresh phantoms, {zs['eval_per_class']} per class, seed {zs['eval_seed']})",
        "",
        "Name prompts average three templates (\"a chest x-ray with {name}\", ...); description prompts average 12 "
        "sampled attribute descriptions per class (CuPL-style, no training).",
        "",
        "| class | name prompts (%) | description prompts (%) |",
        "|---|---|---|",
    ]
    for c in zs["name"]["per_class"]:
        tag = " (held out)" if c in side["held_out"] else ""
        lines.append(f"| {c}{tag} | {_pct(zs['name']['per_class'][c])} | {_pct(zs['description']['per_class'].get(c))} |")
    for kind in ("name", "description"):
        r = zs[kind]
        au = ", ".join(f"{k} {v:.3f}" for k, v in r["held_out_auroc"].items())
        lines.append(f"| **known mean ({kind})** | {_pct(r['known_mean']) if kind == 'name' else ''} | "
                     f"{_pct(r['known_mean']) if kind == 'description' else ''} |")
        lines.append(f"| held-out AUROC ({kind}) | {au} | |")
    lines += [
        "",
        "## Intended use and limits",
        "Demonstration and testing of medkt's knowledge-transfer engine only. Synthetic images; no clinical meaning.",
        "",
    ]
    out.write_text("\n".join(lines))
    return out
