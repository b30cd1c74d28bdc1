"""Every shipped bundle is a well-formed MONAI bundle that resolves without overrides."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from medkt.bundles import REPO_BUNDLES, list_bundles

BUNDLES = sorted(p.parent.parent for p in REPO_BUNDLES.glob("*/configs/metadata.json"))
META_FIELDS = ["version", "changelog", "monai_version", "pytorch_version", "numpy_version", "name", "task",
               "description", "authors", "copyright", "data_source", "data_type", "image_classes",
               "label_classes", "pred_classes", "eval_metrics", "intended_use", "references", "network_data_format"]


def test_all_bundles_listed():
    assert {b.name for b in list_bundles()} >= {p.name for p in BUNDLES}
    assert len(BUNDLES) >= 1


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_bundle_layout_and_metadata(bundle: Path):
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    missing = [f for f in META_FIELDS if f not in meta]
    assert not missing, f"{bundle.name}: metadata lacks {missing}"
    assert meta["version"] in meta["changelog"]
    assert meta["name"] == bundle.name
    assert (bundle / "LICENSE").is_file() and (bundle / "docs" / "README.md").is_file()
    assert not (bundle / "scripts").exists(), "reusable code belongs in medkt/, not bundle scripts"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda p: p.name)
def test_bundle_configs_resolve_without_overrides(bundle: Path):
    """What `python -m monai.bundle run` sees: imports work and output_dir resolves by itself."""
    from monai.bundle import ConfigParser

    for cfg in sorted((bundle / "configs").glob("*.json")):
        if cfg.name == "metadata.json":
            continue
        parser = ConfigParser()
        files = [str(bundle / "configs" / "transfer.json"), str(cfg)] if cfg.name != "transfer.json" else [str(cfg)]
        parser.read_config(files)
        parser.read_meta(str(bundle / "configs" / "metadata.json"))
        assert "pipeline" in parser and "run" in parser, cfg
        out = parser.get_parsed_content("output_dir")
        assert isinstance(out, str) and bundle.name in out, (cfg, out)
