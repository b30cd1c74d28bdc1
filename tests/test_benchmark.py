"""The performance benchmark runs end to end on a tiny model (not a timed test)."""
from __future__ import annotations

import json
import math

import torch

REQUIRED = ("time_to_concept_s", "time_to_concept_paper_s", "final_similarity", "final_similarity_paper",
            "inversion_flops_fraction_of_peak", "m2ib_speedup")


def test_benchmark_runs_on_tiny_model(tmp_path):
    from benchmarks.run import SIM_CACHE, main

    cache_before = SIM_CACHE.read_text() if SIM_CACHE.is_file() else None
    out = tmp_path / "bench.json"
    try:
        res = main(["--json", str(out), "--tiny", "--threads", "1"])
    finally:
        torch.set_num_threads(1)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res, default=float))
    for key in REQUIRED:
        assert isinstance(data[key], float) and math.isfinite(data[key]), key
    # the default recipe spends fewer steps than the paper's, so its projected time is shorter
    assert data["time_to_concept_s"] < data["time_to_concept_paper_s"]
    breakdown = data["time_to_concept_breakdown"]
    assert sum(s["steps"] for s in breakdown["paper"]["stages"]) == data["recipes"]["paper"]["steps"]
    # real FLOPs were counted for one step (forward + input-gradient backward of the tiny ViT)
    assert data["inversion_flops_per_step"] > 0 and data["inversion_flops_fraction_of_peak"] > 0
    # both similarity runs were real inversions toward the text
    assert -1 <= data["final_similarity"] <= 1 and -1 <= data["final_similarity_paper"] <= 1
    assert data["similarity_runs"]["paper"]["steps_run"] == [data["recipes"]["paper"]["steps"]]
    # M2IB: cached and naive paths give identical maps
    assert data["m2ib"]["identical_maps"] is True and data["m2ib_speedup"] > 0
    assert data["zero_shot"]["text_cached"] is True
    assert data["peak_memory_mb"] > 0 and len(data["loadavg_start"]) == 3
    # streamed evaluation timed against a plain open_clip loop on the same images: same scores
    vs = data["eval_vs_open_clip"]
    assert data["eval_vs_open_clip_ratio"] == vs["ratio"] > 0 and vs["n_images"] == 16
    assert vs["max_abs_score_difference"] < 1e-5
    # tiny runs never write the shared similarity cache
    assert (SIM_CACHE.read_text() if SIM_CACHE.is_file() else None) == cache_before
