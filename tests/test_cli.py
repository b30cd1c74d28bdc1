"""The CLI and bundle runner: end-to-end runs and the promised user errors (exit 2, one line)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
FAST = ["--set", "inversion#steps=8", "--set", "evaluations#held_out_inversions#n_images=2"]


def medkt_subprocess(*args: str) -> subprocess.CompletedProcess:
    """The real installed entry point in a fresh interpreter."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "medkt", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)




def test_transfer_end_to_end_and_refuses_to_overwrite(tmp_path, medkt):
    out = tmp_path / "run"
    r = medkt_subprocess("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *FAST)
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["bundle"] == "quickstart_tiny" and res["seconds_transfer"] > 0
    ev = res["evaluations"]["held_out_inversions"]
    assert set(ev["before"]["per_class"]) == {"moongate", "gyroscope"}
    for f in ("report.md", "settings.json", "finetuned.safetensors", "inversion/grid.png", "inversion/manifest.csv"):
        assert (out / f).is_file(), f
    assert "top-1" in r.stdout
    # a second run into the same folder is refused, the first run stays intact
    r2 = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), *FAST)
    assert r2.returncode == 2 and "--overwrite" in r2.stderr
    assert "Traceback" not in r2.stderr and (out / "results.json").is_file()
    r3 = medkt("transfer", "--bundle", "quickstart_tiny", "--output", str(out), "--overwrite", *FAST)
    assert r3.returncode == 0, r3.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["transfer", "--bundle", "no_such_bundle"], "unknown bundle 'no_such_bundle'"),
        (["transfer", "--bundle", "quickstart_tiny", "--set", "inversionz#steps=3"], "unknown config key"),
        (["transfer", "--bundle", "quickstart_tiny", "--set", "inversion#stepz=3"], "unknown inversion option"),
        (["transfer", "--bundle", "quickstart_tiny", "--set", "nonsense"], "expected key=value"),
        (["transfer", "--bundle", "quickstart_tiny", "--set", "backend=clip:ViT-B-32@/no/such/file.pt"],
         "weights not found: /no/such/file.pt"),
        (["transfer", "--bundle", "quickstart_tiny", "--set", "inversion={\"steps\": 0}"], "inversion#steps = 0: expected integer >= 1"),
    ],
)
def test_user_errors_exit_2_one_line_nothing_written(tmp_path, medkt, args, message):
    out = tmp_path / "run"
    r = medkt(*args, "--output", str(out))
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    err_lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err_lines) == 1 and message in err_lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_debug_shows_traceback(tmp_path, medkt):
    r = medkt("--debug", "transfer", "--bundle", "no_such_bundle", "--output", str(tmp_path / "x"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_typer_exit_codes_propagate(medkt):
    import typer

    from medkt.cli import app

    @app.command("exit-two-for-test", hidden=True)
    def _exit_two() -> None:
        raise typer.Exit(2)

    assert medkt("exit-two-for-test").returncode == 2


def test_bundles_lists_descriptions(medkt):
    r = medkt("bundles")
    assert r.returncode == 0 and "quickstart_tiny" in r.stdout and "smoke test" in r.stdout


def test_monai_bundle_run_entry_point(tmp_path):
    cfg = REPO / "bundles/quickstart_tiny/configs"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "mrun"
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(cfg / "transfer.json"),
                        "--meta_file", str(cfg / "metadata.json"), "--output_dir", str(out),
                        "--inversion#steps", "6", "--evaluations#held_out_inversions#n_images", "2"],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["pipeline"] == "transfer"


def test_invert_finetune_evaluate_commands(tmp_path, medkt):
    inv = tmp_path / "inv"
    r = medkt("invert", "--backend", "clip:medkt-tiny-ViT@random", "--concept", "moongate=a round archway",
              "--concept", "gyroscope=a disc in rings", "--n-images", "2", "--steps", "5", "--output", str(inv))
    assert r.returncode == 0, r.stderr
    assert (inv / "manifest.csv").is_file() and len(list((inv / "images").glob("*.png"))) == 4
    w = tmp_path / "ft.safetensors"
    r = medkt("finetune", "--backend", "clip:medkt-tiny-ViT@random", "--images", str(inv / "manifest.csv"),
              "--output", str(w), "--set", "lr=1e-4", "--set", 'controls=[{"name": "wise", "alpha": 0.5}]')
    assert r.returncode == 0, r.stderr
    assert w.is_file()
    # evaluate the fine-tuned model on the inverted images through a medkt manifest
    (tmp_path / "m.csv").write_text("path,label\n" + "".join(
        f"inv/images/{p.name},{p.name.split('_')[0]}\n" for p in sorted((inv / "images").glob("*.png"))))
    (tmp_path / "classes.json").write_text(json.dumps({"moongate": ["a round archway"], "gyroscope": ["a disc in rings"]}))
    r = medkt("evaluate", "--backend", "clip:medkt-tiny-ViT@random", "--manifest", str(tmp_path / "m.csv"),
              "--classes", str(tmp_path / "classes.json"), "--weights", str(w), "--output", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "e.json").read_text())["n_images"] == 4
    assert "tensors (" in r.stdout and "differ from clip:medkt-tiny-ViT@random" in r.stdout
    # "nothing changed" is visible: weights equal to the base model's are counted and warned about
    from safetensors.torch import load_file, save_file

    from medkt.backends import create_backend

    torch.manual_seed(0)
    base = create_backend("clip:medkt-tiny-ViT@random").state_dict()
    same = tmp_path / "same.safetensors"
    save_file({k: base[k].contiguous() for k in load_file(str(w))}, str(same))
    torch.manual_seed(0)
    r = medkt("evaluate", "--backend", "clip:medkt-tiny-ViT@random", "--manifest", str(tmp_path / "m.csv"),
              "--classes", str(tmp_path / "classes.json"), "--weights", str(same))
    assert r.returncode == 0, r.stderr
    assert " 0 of " in r.stdout and "equal the base model" in r.stderr
    # a manifest row whose file is missing is a one-line user error
    (tmp_path / "bad.csv").write_text("path,label\nnope.png,moongate\n")
    r = medkt("evaluate", "--backend", "clip:medkt-tiny-ViT@random", "--manifest", str(tmp_path / "bad.csv"),
              "--classes", str(tmp_path / "classes.json"))
    assert r.returncode == 2 and "bad.csv:2" in r.stderr and "file not found" in r.stderr
