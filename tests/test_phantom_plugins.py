"""A finding registered by a plugin module is taught through the phantom bundle (code review defect 6)."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import run_medkt_in_process
from medkt.phantom.backend import DEFAULT_CHECKPOINT

FAST = ["--set", "seeds=1", "--set", "eval_per_class=3", "--set", "segmentation=false",
        "--set", "recipe#n_images=2", "--set", "recipe#inversion#steps=2", "--set", "recipe#finetune#epochs=1"]


def test_load_plugins_registers_and_names_a_bad_module():
    from medkt.errors import ConfigError
    from medkt.phantom import list_findings, load_plugins, unregister_finding

    unregister_finding("test speck")
    sys.modules.pop("phantom_plugin_example", None)
    assert load_plugins(["phantom_plugin_example"]) == ["test speck"]
    assert "test speck" in list_findings()
    with pytest.raises(ConfigError, match="no_such_plugin_module"):
        load_plugins(["no_such_plugin_module"])


def test_experiment_classes_default_to_known_descriptions_plus_novel():
    from medkt.phantom import BUILTIN_FINDINGS, load_plugins
    from medkt.phantom.experiment import PhantomTransferExperiment

    load_plugins(["phantom_plugin_example"])
    known = {c: f"description of {c}" for c in BUILTIN_FINDINGS if c != "nodule"}
    exp = PhantomTransferExperiment("phantom:base", "test speck", "a tiny bright speck", known, eval_per_class=1)
    assert exp.classes == [*known, "test speck"] and exp.known == list(known)
    # the bundle's own case keeps the old class order (nodule last)
    exp = PhantomTransferExperiment("phantom:base", "nodule", "small round", known, eval_per_class=1)
    assert exp.classes == list(BUILTIN_FINDINGS)


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="shipped phantom checkpoint missing")
def test_bundle_teaches_a_plugin_finding(tmp_path, monkeypatch, capsys):
    from medkt.phantom import unregister_finding

    unregister_finding("test speck")
    sys.modules.pop("phantom_plugin_example", None)
    out = tmp_path / "run"
    base = ["transfer", "--bundle", "phantom_nodules", "--output", str(out), *FAST,
            "--set", "novel=test speck", "--set", "description=a tiny bright speck in the lung"]
    # without the plugin module the finding is unknown: one-line error that names the fix
    code, cap = run_medkt_in_process(monkeypatch, capsys, *base)
    assert code == 2 and "test speck" in cap.err and "plugins" in cap.err
    code, cap = run_medkt_in_process(monkeypatch, capsys, *base, "--set", 'plugins=["phantom_plugin_example"]')
    assert code == 0, cap.err
    res = json.loads((out / "results.json").read_text())
    assert res["novel"] == "test speck"
    assert "test speck" in res["arms"]["transfer"]["per_class"] and "nodule" not in res["arms"]["transfer"]["per_class"]


def test_extra_held_out_findings_draw_a_lesion_and_never_name_themselves():
    from medkt.phantom import BUILTIN_FINDINGS, list_findings, make_phantom
    from medkt.phantom.findings import EXTRA_HELD_OUT
    from medkt.phantom.world import get_finding

    for name in EXTRA_HELD_OUT:
        assert name in list_findings() and name not in BUILTIN_FINDINGS  # default class lists unchanged
        assert name in get_finding(name).definition
        for i in range(6):
            p = make_phantom(name, 7, i)
            assert p.mask.any() and p.image.shape == (64, 64)
            assert name not in p.describe(i).lower()
