"""run.log, settings.json and results.json record where and how a run computed (issue 18, item 5):
the resolved device and precision (never "auto"), GPU name and memory, torch/CUDA versions, world size."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medkt.distributed import runtime_record
from medkt.pipelines.base import Pipeline


class _Noop(Pipeline):
    def _run(self, out: Path) -> dict:
        return {"ok": True}


def test_cpu_run_records_resolved_device_precision_and_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    results = _Noop(output_dir=out, device="auto", precision="auto").run()
    settings = json.loads((out / "settings.json").read_text())
    on_disk = json.loads((out / "results.json").read_text())
    for rt in (results["runtime"], settings["runtime"], on_disk["runtime"]):
        assert rt["device"] == "cpu" and rt["device_requested"] == "auto"
        assert rt["precision"] == "fp32" and rt["precision_requested"] == "auto" and rt["dtype"] == "float32"
        assert rt["gpu_name"] is None and rt["gpu_memory_gib"] is None
        assert rt["torch"] == torch.__version__ and rt["cuda"] == torch.version.cuda and rt["world_size"] == 1
    assert settings["device"] == "cpu" and settings["precision"] == "fp32"
    log = (out / "run.log").read_text()
    assert "device cpu (requested auto), precision fp32 (float32; requested auto)" in log
    assert f"torch {torch.__version__}" in log and "world size 1" in log


def test_cpu_bf16_is_recorded_as_bf16(tmp_path):
    rt = runtime_record("cpu", "bf16")
    assert rt["precision"] == "bf16" and rt["dtype"] == "bfloat16" and rt["device"] == "cpu"


def fake_cuda(monkeypatch, name: str = "NVIDIA H100 80GB HBM3", memory: int = 85_520_809_984) -> None:
    """torch.cuda as on a 2-GPU host (nothing is allocated: only the query functions are faked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(total_memory=memory))
    monkeypatch.setattr(torch.version, "cuda", "12.6")


def test_cuda_fields(monkeypatch):
    fake_cuda(monkeypatch)
    rt = runtime_record("auto", "auto")
    assert rt["device"] == "cuda:0" and rt["precision"] == "bf16" and rt["dtype"] == "bfloat16"
    assert rt["gpu_name"] == "NVIDIA H100 80GB HBM3" and rt["gpu_memory_gib"] == pytest.approx(79.6, abs=0.05)
    assert rt["cuda"] == "12.6"
    assert runtime_record("cuda:1", "fp16")["device"] == "cuda:1"


def test_torchrun_rank_records_its_gpu(monkeypatch):
    # WORLD_SIZE without a process group: local_device picks cuda:LOCAL_RANK; the world size
    # recorded is that of the process group (1 here, none was joined)
    fake_cuda(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime_record("auto", "auto")["device"] == "cuda:1"
    import medkt.distributed as mdist

    monkeypatch.setattr(mdist, "world_size", lambda: 2)
    assert runtime_record("auto", "auto")["world_size"] == 2


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False), ("3", False)])
def test_result_table_printed_by_rank_0_only(medkt, monkeypatch, rank, printed):
    # before: under torchrun every rank printed the table (rank > 0 reads rank 0's results.json)
    from medkt import bundles

    monkeypatch.setattr(bundles, "run_bundle", lambda *a, **k: {"summary_table": "| class | before | after |"})
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", rank)
    code, out, err = medkt("transfer", "--bundle", "quickstart_tiny")
    assert code == 0, err
    assert ("| class | before | after |" in out) is printed


def test_single_process_pipeline_runs_on_rank_0_only_under_torchrun(tmp_path, monkeypatch):
    # before: every rank ran the whole pipeline into the same run folder
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "run"
    assert _Noop(output_dir=out).run() == {}
    assert not out.exists() and not (tmp_path / "run.partial").exists()
    monkeypatch.setenv("RANK", "0")
    assert _Noop(output_dir=out).run()["ok"] is True and (out / "results.json").is_file()
