"""The two commands a user runs, end to end, as subprocesses."""

import csv
import json
import subprocess
import sys

import h5py
import pytest
import yaml

from caption_tf.config import load_config, load_saved_config
from conftest import REPO_ROOT, h5_arrays, tiny_overrides, cli_flags, preset_sizes


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_train_then_evaluate_end_to_end(tmp_path):
    # With the conv grid adapter and a grid encoder layer (today's `fast` grid): evaluate.py must rebuild them.
    # Batches of whole images (`--group-by-image`): the grid side runs once per image.
    overrides = tiny_overrides(tmp_path, epochs=1, decoder="gru", attention="luong", grid_adapter="conv",
                               encoder_layers=1, num_heads=2, run_name="e2e")
    done = _run([str(REPO_ROOT / "train.py"), "--preset", "minimal", "--group-by-image", *cli_flags(overrides)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "e2e"
    manifest = json.loads(next((tmp_path / "cache").rglob("manifest.json")).read_text())
    steps = -(-manifest["splits"]["train"]["count"] // round(16 / 5))  # batch_size 16 captions: 3 images of 5
    assert f"{steps}/{steps}" in done.stdout
    for name in ("config.yaml", "vocab.json", "run.json", "model.weights.h5", "history.csv", "metrics.json", "skips.json"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "logs").rglob("events.out.tfevents*"))
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert cfg["model"]["decoder"] == "gru" and cfg["model"]["attention"] == "luong" and cfg["preset"] == "minimal"
    assert cfg["model"]["encoder_layers"] == 1 and cfg["model"]["grid_adapter"] == "conv" and cfg["train"]["group_by_image"]
    with h5py.File(run_dir / "model.weights.h5", "r") as fh:
        names = []
        fh.visit(names.append)
    assert any("grid_encoder/encoder_0/attention" in n for n in names), names
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["greedy"]) >= {"bleu1", "bleu2", "bleu3", "bleu4"}
    assert "Test metrics" in done.stdout
    # A model that ends below the blind baseline is not reported as if it were fine.
    below = metrics["greedy"]["bleu4"] < metrics["blind_baseline"]["bleu4"]
    assert ("is below the blind baseline" in done.stderr) == below

    report_dir = tmp_path / "report"
    fast = ["--no-meteor", "--no-resources", "--no-embeddings"]
    evaluated = _run([str(REPO_ROOT / "evaluate.py"), "--run", str(run_dir), "--out", str(report_dir), *fast], tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert (report_dir / "report.html").exists()
    report = json.loads((report_dir / "metrics.json").read_text())
    greedy = report["runs"]["e2e"]["greedy"]["scores"]
    # Reloading the run from its folder reproduces the test metrics printed by training.
    for n in range(1, 5):
        assert greedy[f"bleu{n}"] == metrics["greedy"][f"bleu{n}"]


def test_the_fast_preset_trains_and_captions_with_its_own_model(tmp_path):
    # `python train.py --preset fast --weights none` as shipped, on tiny data: the preset's GRU + Bahdanau,
    # grid adapter, encoder layer, warm-up + cosine learning rate, batches of whole images and early stopping
    # on val_bleu4 all run together, and the run folder records them (only the sizes below are the test's).
    sizes = preset_sizes(tmp_path, num_images=60, epochs=2)
    done = _run([str(REPO_ROOT / "train.py"), "--preset", "fast", *cli_flags(sizes)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    run_dir = tmp_path / "runs" / "fast-shapes-mobilenet_v3_small-gru-bahdanau"
    saved, fast = load_saved_config(run_dir / "config.yaml"), load_config("fast")
    assert (saved.model.decoder, saved.model.attention) == (fast.model.decoder, fast.model.attention) == ("gru", "bahdanau")
    assert saved.model.grid_adapter == fast.model.grid_adapter == "conv" and saved.model.encoder_layers == fast.model.encoder_layers == 1
    assert saved.train.group_by_image and saved.train.early_stopping_monitor == fast.train.early_stopping_monitor == "val_bleu4"
    with open(run_dir / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    # One epoch of warm-up to the preset's peak, then the cosine down to 0 at the last epoch.
    assert [float(row["learning_rate"]) for row in history] == pytest.approx([fast.train.learning_rate, 0.0], abs=1e-7)
    assert all(row["val_bleu4"] for row in history)
    names = list(h5_arrays(run_dir / "model.weights.h5"))
    assert any(name.startswith("grid_encoder/adapter/") for name in names), names
    assert any(name.startswith("grid_encoder/encoder_0/") for name in names), names
    assert not any(name.startswith("grid_encoder/encoder_1/") for name in names), names
    assert "Test metrics (6 images, greedy)" in done.stdout  # the 6 test scenes of 60 were captioned


def test_bad_flags_and_missing_weights_give_one_clear_line(tmp_path):
    bad = _run([str(REPO_ROOT / "train.py"), "--decoder", "mamba"], tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = _run([str(REPO_ROOT / "train.py"), *cli_flags(tiny_overrides(tmp_path, weights=tmp_path / "nope.weights.h5"))], tmp_path)
    assert missing.returncode == 2
    assert "nope.weights.h5: no such file" in missing.stderr and "Traceback" not in missing.stderr
    no_run = _run([str(REPO_ROOT / "evaluate.py"), "--run", str(tmp_path / "nothing")], tmp_path)
    assert no_run.returncode == 2 and "config.yaml: missing" in no_run.stderr


EXIT_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
from caption_tf.cli import main_guard

out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))

def late_writer():
    time.sleep(0.5)
    (out / "thread").write_text("done")

def entry_point():
    threading.Thread(target=late_writer).start()
    print("last line", end="")  # no newline: only a flush puts it out
    return 3

main_guard(entry_point, skip_teardown=True)
"""


def test_the_scripts_exit_skips_only_the_teardown(tmp_path):
    """train.py and evaluate.py exit without Python's module teardown (1.2 s with TensorFlow loaded),
    but with the exit code, the flushed output, the atexit handlers and the non-daemon threads' work."""
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 3 and done.stdout == "last line", (done.returncode, done.stdout, done.stderr[-2000:])
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "done"
