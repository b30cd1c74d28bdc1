"""The three scripts in examples/ run end to end on tiny settings (phantom model, a few phantoms).

They run in this process (``main(argv)``), so the imports are paid once; each writes what its
docstring promises.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = ["--steps", "2", "--n-images", "2", "--epochs", "1", "--device", "cpu"]


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"medkt_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    """PNG and DICOM phantoms of three findings, 2 each: ``ROOT/images/<finding>/``, ``ROOT/masks/...``."""
    from medkt.phantom.export import export_dataset

    root = tmp_path_factory.mktemp("phantoms")
    for fmt in ("png", "dicom"):
        export_dataset(root / fmt, ["no finding", "mass", "nodule"], 2, seed=3, size=64, fmt=fmt)
    return root


@pytest.mark.parametrize("fmt", ["png", "dicom"])
def test_teach_concept(phantoms, tmp_path, capsys, fmt):
    out = tmp_path / "run"
    summary = _example("teach_concept").main(["--images", str(phantoms / fmt / "images"), "--out", str(out), *TINY])
    printed = capsys.readouterr().out
    assert "AUROC of 'nodule'" in printed and "top-1" in printed
    ev = summary["evaluations"]["images"]
    assert ev["before"]["n_images"] == ev["after"]["n_images"] == 6
    assert set(ev["after"]["per_class"]) == {"mass", "no_finding", "nodule"}
    assert summary["finetune"]["steps"] == 1  # 2 images, batch 4, 1 epoch
    assert json.loads((out / "results.json").read_text())["concepts"] == ["nodule"]
    assert (out / "finetuned.safetensors").is_file() and (out / "inversion" / "manifest.csv").is_file()


def test_teach_concept_needs_the_concept_folder(phantoms, tmp_path):
    with pytest.raises(SystemExit):
        _example("teach_concept").main(["--images", str(phantoms / "png" / "images"), "--concept", "tumour",
                                        "--out", str(tmp_path), *TINY])


def test_compare_prompts(phantoms, tmp_path, capsys):
    table = _example("compare_prompts").main(["--images", str(phantoms / "png" / "images"), "--out", str(tmp_path),
                                              *TINY])
    assert list(table) == ["name prompts", "description prompts", "transfer + name prompts"]
    for row in table.values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["concept_auroc"] <= 1
    assert "description prompts" in capsys.readouterr().out
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert {m: r["accuracy"] for m, r in saved.items()} == {m: r["accuracy"] for m, r in table.items()}


@pytest.mark.parametrize("sam", [None, "tiny@random"])
def test_segment_folder(phantoms, tmp_path, sam):
    argv = ["--images", str(phantoms / "png" / "images" / "mass"), "--masks", str(phantoms / "png" / "masks" / "mass"),
            "--steps", "2", "--device", "cpu", "--out", str(tmp_path)]
    summary = _example("segment_folder").main(argv + (["--sam", sam] if sam else []))
    assert summary["mode"] == ("sam" if sam else "saliency-only")
    assert summary["n_images"] == 2 and all(0 <= v <= 1 for v in summary["mean"].values())
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["mass_00000.png", "mass_00001.png"]
    assert (tmp_path / "metrics.csv").read_text().startswith("name,dsc,nsd,iou")


def test_docs_phantom_finding_example(tmp_path):
    """The plugin in docs/bundles.md ("Adding a phantom finding") registers, draws and describes."""
    import re

    from medkt.phantom import make_phantom, unregister_finding

    page = (EXAMPLES.parent / "docs" / "bundles.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "register_finding(" in b)
    try:
        exec(compile(code, "docs/bundles.md", "exec"), {})
        p = make_phantom("granuloma", seed=0, index=1, size=64)
        assert p.mask.any() and p.image.shape == (64, 64)
        text = p.describe(0)
        assert "granuloma" not in text and "calcified spot in the" in text  # described without its name
    finally:
        unregister_finding("granuloma")
