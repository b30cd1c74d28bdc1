"""Phantom pretraining script end to end at toy size (the reproducibility path of the shipped model)."""
from __future__ import annotations

import json

import torch


def test_pretrain_main_writes_a_loadable_model_with_progress(tmp_path, caplog, monkeypatch):
    from medkt.backends import create_backend
    from medkt.phantom.pretrain import main

    monkeypatch.setenv("MEDKT_PROGRESS_SECONDS", "0")  # a progress line on every update
    cfg = {"seed": 3, "data_seed": 7, "held_out": ["nodule"], "n_per_class": 3, "captions_per_image": 2,
           "image_size": 64, "steps": 4, "batch_size": 6, "warmup": 1, "glossary_per_finding": 4,
           "glossary_batch": 4, "threads": 1, "eval_per_class": 2, "save_every": 2}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    out = tmp_path / "model" / "phantom_clip.safetensors"
    caplog.set_level("INFO", logger="medkt.progress")
    main(["--config", str(tmp_path / "cfg.json"), "--out", str(out), "--model-card", str(tmp_path / "model" / "MODEL_CARD.md")])
    assert any(r.message.startswith("pretrain: ") for r in caplog.records)  # the progress reporter ran
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["pretrain_config"]["seed"] == 3 and meta["held_out"] == ["nodule"]
    assert len(meta["history"]) >= 1 and meta["history"][-1]["step"] == 3
    assert (tmp_path / "model" / "MODEL_CARD.md").is_file()
    backend = create_backend(f"phantom:base@{out.parent}")
    emb = backend.encode_images(torch.rand(2, 1, 64, 64))
    assert emb.shape[0] == 2 and torch.isfinite(emb).all()
