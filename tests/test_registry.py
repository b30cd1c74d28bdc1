"""One registry mechanism (medkt.registry) for backends, objectives, losses, vision splits,
prompt generators, preparers and findings; plug-ins through entry points."""
from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from medkt.errors import ConfigError, UnknownNameError
from medkt.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def test_register_get_meta_and_unknown_names():
    reg: Registry = Registry("widget")
    reg.register("round", len, shape="circle")

    @reg.register("square")
    def square(x):
        return x * x

    assert reg.get("round") is len and reg.get("square")(3) == 9
    assert reg.meta("round", "shape") == "circle" and reg.meta("square", "shape", "none") == "none"
    assert reg.names() == ["round", "square"] and "round" in reg and 3 not in reg
    with pytest.raises(UnknownNameError, match=r"unknown widget 'sqare'\. Did you mean 'square'\?"):
        reg.get("sqare")
    with pytest.raises(ConfigError, match="already registered"):
        reg.register("round", abs, overwrite=False)
    reg.unregister("round")
    assert reg.names() == ["square"]


def test_lazy_entries_import_on_first_use():
    reg: Registry = Registry("thing")
    reg.register_lazy("dumps", "json:dumps")
    assert reg._entries["dumps"] == "json:dumps"  # nothing imported yet
    import json

    assert reg.get("dumps") is json.dumps
    with pytest.raises(ConfigError, match="module:attribute"):
        reg.register_lazy("bad", "json.dumps")


def test_installed_entry_points_match_pyproject():
    """A stale install (pyproject changed, not reinstalled) would hide plug-ins: fail loudly."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, eps in declared.items():
        installed = {ep.name: ep.value for ep in metadata.entry_points(group=group)}
        for name, value in eps.items():
            assert installed.get(name) == value, f"entry point {group}:{name} not installed: run `make install`"


def test_builtin_plugins_are_found_through_their_groups():
    from medkt.backends import list_backends
    from medkt.data.prepare import list_preparers
    from medkt.finetune import loss_names
    from medkt.inversion import objective_names
    from medkt.phantom.world import list_findings

    assert {"itm"} <= set(objective_names()) and {"cosine", "l2", "contrastive"} <= set(objective_names())
    assert {"infonce", "itm", "mlm", "clip+caption"} <= set(loss_names())
    assert {"udiat", "flickr30k", "jsrt"} <= set(list_preparers())
    assert "phantom" in list_backends() and "nodule" in list_findings()


def test_a_research_script_registers_an_objective_the_way_medkt_does(tiny_clip):
    """The 'write your own' recipe: one function, one registry line, then it is a config choice."""
    from medkt.inversion import INVERSION_OBJECTIVES, InversionConfig, InversionTarget, invert

    calls = []

    @INVERSION_OBJECTIVES.register("half_cosine", uses_text_embeddings=True)
    def half_cosine(backend, x, ctx):
        calls.append(x.shape[0])
        emb = torch.nn.functional.normalize(backend.encode_pixels(x).float(), dim=-1)
        sim = (emb * ctx.text_emb).sum(-1)
        return -0.5 * sim, sim

    try:
        cfg = InversionConfig.from_dict({"steps": 2, "objective": "half_cosine"})
        invert(tiny_clip, [InversionTarget("dog", "a dog", 2)], cfg, progress=False)
        assert calls == [2, 2]
        with pytest.raises(ConfigError, match="half_cosin"):
            InversionConfig.from_dict({"objective": "half_cosin"})
    finally:
        INVERSION_OBJECTIVES.unregister("half_cosine")
