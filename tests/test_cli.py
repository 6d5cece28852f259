"""The two commands a user runs, end to end, as subprocesses."""

import json
import subprocess
import sys

import h5py
import yaml

from conftest import REPO_ROOT, tiny_overrides


def _flags(overrides: dict) -> list[str]:
    return [item for k, v in overrides.items() for item in (f"--{k.replace('_', '-')}", str(v))]


def _run(args, cwd):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_train_then_evaluate_end_to_end(tmp_path):
    # With the conv grid adapter and a grid encoder layer (today's `fast` grid): evaluate.py must rebuild them.
    # Batches of whole images (`--group-by-image`): the grid side runs once per image.
    overrides = tiny_overrides(tmp_path, epochs=1, decoder="gru", attention="luong", grid_adapter="conv",
                               encoder_layers=1, num_heads=2, run_name="e2e")
    done = _run([str(REPO_ROOT / "train.py"), "--preset", "minimal", "--group-by-image", *_flags(overrides)], tmp_path)
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


def test_bad_flags_and_missing_weights_give_one_clear_line(tmp_path):
    bad = _run([str(REPO_ROOT / "train.py"), "--decoder", "mamba"], tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    missing = _run([str(REPO_ROOT / "train.py"), *_flags(tiny_overrides(tmp_path, weights=tmp_path / "nope.weights.h5"))], tmp_path)
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
