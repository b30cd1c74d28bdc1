"""Resume safety (issue 12, item 1), run logs and progress without a terminal (item 3).

Runs go through ``medkt.cli.main`` in this process (tiny random CLIP, a few seconds each); an
"interrupted" run is one stopped by Ctrl-C (KeyboardInterrupt) at its 2nd inversion checkpoint.
The kill -9 matrix is in ``test_kill_resume.py``.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch

from medkt.checkpoints import describe_changes, guard_resume, load_checkpoint, save_checkpoint
from medkt.errors import CheckpointError, ConfigError, DataError, ResumeMismatchError
from medkt.inversion import InversionConfig, InversionTarget, invert
from medkt.pipelines.base import Pipeline
from medkt.progress import Progress, log_interval
from test_kill_resume import TINY

REPO = Path(__file__).resolve().parent.parent
TARGETS = [InversionTarget("moongate", "a round opening in a garden wall", 2),
           InversionTarget("gyroscope", "a spinning disc inside rings", 1)]




@pytest.fixture
def interrupted(medkt, monkeypatch, tmp_path):
    """``run.partial`` of a transfer stopped by Ctrl-C at its 2nd inversion checkpoint; returns
    (output folder, {checkpoint path: bytes})."""
    import medkt.inversion as inv

    real, calls = inv.fault_point, {"n": 0}

    def ctrl_c_at_second(name: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(inv, "fault_point", ctrl_c_at_second)
    out = tmp_path / "run"
    r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY)
    monkeypatch.setattr(inv, "fault_point", real)
    assert r.returncode == 130, r.stderr[-2000:]
    partial = out.with_name("run.partial")
    saved = {p: p.read_bytes() for p in partial.rglob("*.pt")}
    assert saved, "the interrupted run left no checkpoint"
    return out, saved


def error_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    return lines[0]


def assert_kept(saved: dict[Path, bytes]) -> None:
    assert {p: p.read_bytes() for p in saved if p.is_file()} == saved, "a checkpoint was deleted or changed"


# --- a fixable mistake never costs the checkpoints -------------------------------------------------
def test_fixable_error_on_resume_keeps_checkpoints_then_resume_finishes(medkt, interrupted):
    out, saved = interrupted
    for mistake in (["--set", "backend=clip:ViT-B-32@/no/such/file.pt"],
                    ["--set", 'evaluations#held_out_inversions={"manifest": "/no/such/manifest.csv", '
                              '"classes": {"moongate": ["a moongate"], "gyroscope": ["a gyroscope"]}}']):
        r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, "--resume", *mistake)
        assert "/no/such/" in error_line(r)
        assert_kept(saved)
    r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "results.json").is_file() and not out.with_name("run.partial").exists()
    # run.log: every attempt on this folder, with versions and timings
    log = (out / "run.log").read_text()
    assert log.count("medkt starting") == 1 and log.count("medkt resuming") >= 1
    assert '"torch": "' in log and '"medkt": "' in log and "run finished in" in log
    assert "step/s" in log  # the loops' timing lines


def test_existing_partial_without_resume_is_refused_and_restart_discards_it(medkt, tmp_path):
    out = tmp_path / "run"
    partial = out.with_name("run.partial")
    (partial / "inversion" / "checkpoints").mkdir(parents=True)
    (partial / "inversion" / "checkpoints" / "chunk0000.pt").write_bytes(b"hours of work")
    line = error_line(medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY))
    assert "--resume" in line and "--restart" in line and str(partial) in line
    assert (partial / "inversion" / "checkpoints" / "chunk0000.pt").read_bytes() == b"hours of work"
    line = error_line(medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY,
                            "--resume", "--restart"))
    assert "contradict" in line
    r = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, "--restart")
    assert r.returncode == 0, r.stderr[-2000:]
    assert not partial.exists() and (out / "results.json").is_file()
    assert "medkt resuming" not in (out / "run.log").read_text()


class _Toy(Pipeline):
    """A pipeline that writes a checkpoint and then fails (or not), to test the run folder rules."""

    def __init__(self, fail: str = "", fail_in_validate: bool = False, **kw):
        super().__init__(**kw)
        self.fail, self.fail_in_validate = fail, fail_in_validate

    def validate(self) -> None:
        super().validate()
        if self.fail_in_validate:
            raise DataError("manifest /no/such.csv not found")

    def _run(self, out: Path) -> dict:
        if self.fail == "before writing":
            raise DataError("bad image row 3")
        (out / "chunk0000.pt").write_bytes(b"work")
        if self.fail == "after a checkpoint":
            raise DataError("bad image row 7")
        return {"ok": True}


def test_pipeline_validate_runs_before_any_folder_is_touched(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError):
        _Toy(output_dir=out, fail_in_validate=True).run()
    assert not out.with_name("run.partial").exists() and not out.exists()
    out.with_name("run.partial").mkdir()
    (out.with_name("run.partial") / "chunk0000.pt").write_bytes(b"old work")
    with pytest.raises(DataError):
        _Toy(output_dir=out, fail_in_validate=True, resume=True).run()
    assert (out.with_name("run.partial") / "chunk0000.pt").read_bytes() == b"old work"
    assert not (out.with_name("run.partial") / "run.log").exists()


def test_pipeline_error_keeps_work_and_says_how_to_resume(tmp_path, caplog):
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    with pytest.raises(DataError):
        _Toy(output_dir=out, fail="before writing").run()
    assert not partial.exists()  # nothing was written: nothing to keep, nothing blocks the next run
    with pytest.raises(DataError):
        _Toy(output_dir=out, fail="after a checkpoint").run()
    assert (partial / "chunk0000.pt").is_file()
    log = (partial / "run.log").read_text()
    assert "DataError: bad image row 7" in log and "--resume" in log and "kept in" in log
    assert any("--resume" in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    results = _Toy(output_dir=out, resume=True).run()
    assert results.pop("runtime")["device"] == "cpu"  # the resolved device (see tests/test_run_records.py)
    assert results == {"pipeline": "pipeline", "bundle": None, "seed": 0,
                       "seconds_total": pytest.approx(0, abs=60), "ok": True}
    assert (out / "results.json").is_file() and (out / "settings.json").is_file() and not partial.exists()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["device"] == "cpu" and settings["precision"] == "fp32"  # resolved from "auto" on a CPU host
    assert "restart" not in settings["settings"]


# --- resume never mixes runs -----------------------------------------------------------------------
@pytest.mark.parametrize("change, diff", [
    (["--set", "inversion#lr=0.05"], "inversion.lr: 0.1 -> 0.05"),
    (["--set", "concepts#0#description=a round gate"], "concept 'moongate' description changed"),
])
def test_resume_with_changed_settings_is_refused_with_the_diff(medkt, interrupted, change, diff):
    out, saved = interrupted
    line = error_line(medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, "--resume", *change))
    assert diff in line and "--restart" in line
    assert_kept(saved)


def test_resume_from_a_damaged_checkpoint_names_it(medkt, interrupted):
    out, saved = interrupted
    path = next(iter(saved))
    path.write_bytes(saved[path][: len(saved[path]) // 2])
    line = error_line(medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, "--resume"))
    assert str(path) in line and "truncated" in line
    assert out.with_name("run.partial").is_dir()


def test_invert_command_resume_into_another_runs_folder_is_refused(medkt, tmp_path):
    """``medkt invert --resume`` checks the folder's settings record; it refuses (never mixes
    another run's images with this one's, never deletes them)."""
    out = tmp_path / "inv"
    base = ["invert", "--backend", "clip:medkt-tiny-ViT@random", "--concept", "moongate=a round archway",
            "--n-images", "1", "--steps", "4", "--checkpoint-every", "2", "--output", str(out)]
    assert medkt(*base).returncode == 0
    images = {p: p.read_bytes() for p in (out / "images").glob("*.png")}
    line = error_line(medkt(*base[:-2], "--concept", "gyroscope=a disc in rings", "--output", str(out), "--resume"))
    assert "concept 'gyroscope' added" in line
    line = error_line(medkt(*base, "--lr", "0.3", "--resume"))
    assert "inversion.lr: 0.1 -> 0.3" in line
    assert {p: p.read_bytes() for p in (out / "images").glob("*.png")} == images
    assert "--resume" in error_line(medkt(*base))  # a non-empty folder without --resume
    # the same settings resume (the finished inversion is read back from its last checkpoint)
    assert medkt(*base, "--resume").returncode == 0
    assert {p: p.read_bytes() for p in (out / "images").glob("*.png")} == images
    (out / "checkpoints" / "inversion.settings.json").unlink()
    assert "no record of the settings" in error_line(medkt(*base, "--resume"))


# --- checkpoints and settings records ------------------------------------------------------------
def test_guard_resume_records_and_diffs(tmp_path):
    s = {"backend": "clip:x", "inversion": {"lr": 0.1, "steps": 10, "scale": (0.7, 1.0)},
         "concepts": {"a": {"descriptions": ["a thing"], "n_images": [2]}, "b": {"descriptions": ["b"], "n_images": [1]}}}
    guard_resume(tmp_path, "inversion", s, resume=False)
    assert json.loads((tmp_path / "inversion.settings.json").read_text())["inversion"]["scale"] == [0.7, 1.0]
    guard_resume(tmp_path, "inversion", s, resume=True)  # same settings (tuple vs list is the same)
    changed = {"backend": "clip:x", "inversion": {"lr": 0.05, "steps": 10, "scale": [0.7, 1.0], "views": 2},
               "concepts": {"a": {"descriptions": ["another thing"], "n_images": [3]}, "c": {"descriptions": ["c"], "n_images": [1]}}}
    with pytest.raises(ResumeMismatchError) as err:
        guard_resume(tmp_path, "inversion", changed, resume=True)
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("concept 'a' description changed", "concept 'a' n_images: [2] -> [3]", "concept 'b' removed",
                 "concept 'c' added", "inversion.lr: 0.1 -> 0.05", "inversion.views: (unset) -> 2"):
        assert part in msg, (part, msg)
    guard_resume(tmp_path, "inversion", changed, resume=False)  # a fresh start records the new settings
    guard_resume(tmp_path, "inversion", changed, resume=True)
    assert describe_changes(s, s) == ""
    (tmp_path / "inversion.settings.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="inversion.settings.json"):
        guard_resume(tmp_path, "inversion", s, resume=True)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b[:20], "truncated (header incomplete)"),
    (lambda b: b[:-100] + bytes([b[-100] ^ 0xFF]) + b[-99:], "corrupt (checksum mismatch)"),
    (lambda b: b"", "empty"),
    (lambda b: b"\x00" * len(b), "not a medkt checkpoint"),
])
def test_damaged_checkpoint_is_detected_and_named(tmp_path, damage, message):
    path = save_checkpoint({"step": 3, "pixels": torch.rand(2, 3, 8, 8)}, tmp_path / "chunk0000.pt")
    assert load_checkpoint(path)["step"] == 3
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and message in str(err.value) and "--restart" in str(err.value)


def test_plain_torch_checkpoint_of_older_medkt_loads_but_is_not_trusted_on_resume(tmp_path):
    torch.save({"step": 3}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["step"] == 3
    with pytest.raises(ResumeMismatchError, match="no settings record"):
        load_checkpoint(tmp_path / "old.pt", digest="abc")


def test_invert_resume_checks_settings_and_skips_finished_chunks(tiny_clip, tmp_path):
    cfg = InversionConfig(steps=4, lr=0.1, checkpoint_every=2, chunk_size=2)
    full = invert(tiny_clip, TARGETS, cfg, out_dir=tmp_path, progress=False)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "chunk0000.pt", "chunk0001.pt", "inversion.settings.json"]
    assert all(load_checkpoint(p)["done"] for p in (tmp_path / "checkpoints").glob("*.pt"))
    again = invert(tiny_clip, TARGETS, cfg, out_dir=tmp_path, resume=True, progress=False)  # read back
    assert torch.equal(full.images, again.images) and again.history == full.history
    # checkpoint_every does not change the images: not part of the record
    invert(tiny_clip, TARGETS, InversionConfig(steps=4, lr=0.1, checkpoint_every=4, chunk_size=2),
           out_dir=tmp_path, resume=True, progress=False)
    for other, diff in ((InversionConfig(steps=4, lr=0.1, checkpoint_every=2, chunk_size=1), "inversion.chunk_size: 2 -> 1"),
                        (InversionConfig(steps=4, lr=0.1, checkpoint_every=2, chunk_size=2, seed=5), "inversion.seed: 0 -> 5")):
        with pytest.raises(ResumeMismatchError, match=diff):
            invert(tiny_clip, TARGETS, other, out_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(ResumeMismatchError, match="concept 'gyroscope' n_images: \\[1\\] -> \\[2\\]"):
        invert(tiny_clip, TARGETS[:1] + [InversionTarget("gyroscope", TARGETS[1].text, 2)], cfg,
               out_dir=tmp_path, resume=True, progress=False)
    # a stray chunk file from another run (other settings digest) is refused too
    (tmp_path / "checkpoints" / "chunk0001.pt").write_bytes((tmp_path / "checkpoints" / "chunk0000.pt").read_bytes())
    stray = load_checkpoint(tmp_path / "checkpoints" / "chunk0000.pt")
    stray["settings_digest"] = "0" * 64
    save_checkpoint(stray, tmp_path / "checkpoints" / "chunk0001.pt")
    with pytest.raises(ResumeMismatchError, match="chunk0001.pt was made with other settings"):
        invert(tiny_clip, TARGETS, cfg, out_dir=tmp_path, resume=True, progress=False)


def test_early_stopping_state_survives_a_resume(tiny_clip, tmp_path, monkeypatch):
    import medkt.inversion as inv

    # no step gains 0.5 similarity: the run stops after step 1 + patience; Ctrl-C at the step-1
    # checkpoint, so the resumed run must know the best similarity so far to stop at the same step
    cfg = InversionConfig(steps=40, lr=0.1, checkpoint_every=1,
                          priors=[{"name": "tv"}, {"name": "early_stop", "patience": 2, "min_delta": 0.5}])
    full = invert(tiny_clip, TARGETS, cfg, progress=False)
    assert full.steps_run == [3]

    def ctrl_c(name: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(inv, "fault_point", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        invert(tiny_clip, TARGETS, cfg, out_dir=tmp_path, progress=False)
    monkeypatch.undo()
    resumed = invert(tiny_clip, TARGETS, cfg, out_dir=tmp_path, resume=True, progress=False)
    assert resumed.steps_run == full.steps_run and torch.equal(resumed.images, full.images)


# --- fault points ---------------------------------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("spec, expected", [("here:2", -9), ("here", -9), ("elsewhere", 0), ("", 0)])
def test_fault_point_kills_on_the_selected_visit(spec, expected):
    pid = os.fork()
    if pid == 0:
        try:
            os.environ["MEDKT_FAULT_AT"] = spec
            from medkt.faults import fault_point

            fault_point("here")  # "here:2": the first visit survives
            fault_point("here")
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == expected


# --- progress without a terminal ------------------------------------------------------------------
def test_progress_logs_lines_with_rate_and_eta_without_a_terminal(caplog):
    caplog.set_level(logging.INFO, logger="medkt.progress")
    with Progress(10, "fine-tune", unit="step", every=0, terminal=False) as bar:
        bar.skip(2)
        for _ in range(3):
            bar.set_postfix(loss="0.123")
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records if r.name == "medkt.progress"]
    assert lines[0].startswith("fine-tune: 3/10 step (30%)") and "step/s" in lines[0] and "ETA" in lines[0]
    assert "loss=0.123" in lines[0]
    assert lines[-1].startswith("fine-tune: 3 step in") and "2 resumed from checkpoints" in lines[-1]
    caplog.clear()
    with Progress(10, "quiet", enabled=False, every=0, terminal=False) as bar:
        bar.update(5)
    assert not caplog.records


def test_inversion_progress_lines_without_a_terminal(tiny_clip, caplog, monkeypatch):
    """pytest's captured stderr is not a terminal: what nohup/SLURM/CI logs see."""
    monkeypatch.setenv("MEDKT_PROGRESS_SECONDS", "0")
    caplog.set_level(logging.INFO, logger="medkt.progress")
    invert(tiny_clip, TARGETS, InversionConfig(steps=3), progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "medkt.progress"]
    assert [ln.split(",")[0] for ln in lines[:3]] == [f"inversion: {k}/3 step ({100 * k / 3:.0f}%)" for k in (1, 2, 3)]
    assert all("step/s" in ln for ln in lines) and "ETA" in lines[0] and "sim=" in lines[0]


def test_progress_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv("MEDKT_PROGRESS_SECONDS", raising=False)
    assert log_interval() == 30
    monkeypatch.setenv("MEDKT_PROGRESS_SECONDS", "5")
    assert log_interval() == 5
    monkeypatch.setenv("MEDKT_PROGRESS_SECONDS", "soon")
    with pytest.raises(ConfigError, match="MEDKT_PROGRESS_SECONDS='soon'"):
        log_interval()
