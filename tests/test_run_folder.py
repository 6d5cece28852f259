"""The run folder: atomic publishing, a damaged run.json named in one line, and the way back from it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from caption_tf.files import PARTIAL_PREFIX, atomic_path, write_json
from caption_tf.run_folder import RUN_FILE, WEIGHTS_FILE, RunFolderError, read_run_info
from conftest import REPO_ROOT, tiny_overrides, cli_flags


def _run(script: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600)


def weight_values(path: Path) -> list[bytes]:
    """The arrays of a .weights.h5 file, in a canonical order (layer names differ between processes)."""
    values = []
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: values.append(obj[()].tobytes()) if isinstance(obj, h5py.Dataset) else None)
    return sorted(values)


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    path = tmp_path / "run.json"
    write_json(path, {"status": "training"})
    with pytest.raises(RuntimeError, match="disk gone"):
        with atomic_path(path) as tmp:
            tmp.write_text('{"status": "comp')  # half written when the writer fails
            raise RuntimeError("disk gone")
    assert read_run_info(tmp_path) == {"status": "training"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    with atomic_path(path) as tmp:
        assert tmp.name == PARTIAL_PREFIX + "run.json"
        tmp.write_text('{"status": "complete"}')
    assert read_run_info(tmp_path) == {"status": "complete"}


@pytest.mark.parametrize("damage", [b'{"status": "compl', b"\xff\xfe\x00garbage", b"[1, 2]"])
def test_damaged_run_json_is_named(tmp_path, damage):
    (tmp_path / RUN_FILE).write_bytes(damage)
    with pytest.raises(RunFolderError, match=str(tmp_path / RUN_FILE)):
        read_run_info(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_run_info(tmp_path / "elsewhere")
    assert read_run_info(tmp_path / "elsewhere", missing_ok=True) == {}


def test_truncated_run_json_one_clear_line_then_resume_rewrites_it(tiny_run, tmp_path):
    """evaluate.py names the damaged file; deleting it and rerunning train.py resumes and retrains nothing."""
    cfg, original = tiny_run
    run_dir = tmp_path / "runs" / original.name
    shutil.copytree(original, run_dir)  # the shared run stays intact
    weights = weight_values(run_dir / WEIGHTS_FILE)
    info = (run_dir / RUN_FILE).read_bytes()
    (run_dir / RUN_FILE).write_bytes(info[: len(info) // 2])

    evaluated = _run("evaluate.py", "--run", run_dir, "--out", tmp_path / "report", cwd=tmp_path)
    assert evaluated.returncode == 2
    assert f"error: {run_dir / RUN_FILE} is truncated or damaged" in evaluated.stderr
    assert "Traceback" not in evaluated.stderr

    # The command that made the run (the tiny_run fixture's settings), with the copy's runs folder.
    flags = _train_flags(cfg, tmp_path / "runs")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    refused = _run("train.py", "--preset", "minimal", *flags, cwd=tmp_path)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"error: {run_dir / RUN_FILE} is truncated or damaged" in refused.stderr and "Delete it and rerun" in refused.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before  # nothing touched

    (run_dir / RUN_FILE).unlink()
    trained = _run("train.py", "--preset", "minimal", *flags, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "Resuming from" in trained.stdout
    assert read_run_info(run_dir)["status"] == "complete"
    assert weight_values(run_dir / WEIGHTS_FILE) == weights  # resumed at the end: nothing retrained


def _train_flags(cfg, runs_dir: Path) -> list[str]:
    return cli_flags(tiny_overrides(Path(cfg.data.data_root).parent, epochs=2, runs_dir=runs_dir))


def test_damaged_weights_are_named_then_written_again_from_the_checkpoint(tiny_run, tmp_path):
    cfg, original = tiny_run
    run_dir = tmp_path / "runs" / original.name
    shutil.copytree(original, run_dir)
    weights = weight_values(run_dir / WEIGHTS_FILE)
    data = (run_dir / WEIGHTS_FILE).read_bytes()
    (run_dir / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])

    evaluated = _run("evaluate.py", "--run", run_dir, "--out", tmp_path / "report", cwd=tmp_path)
    assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr
    assert f"error: {run_dir / WEIGHTS_FILE} is damaged" in evaluated.stderr and "Rerun the train.py command" in evaluated.stderr

    trained = _run("train.py", "--preset", "minimal", *_train_flags(cfg, tmp_path / "runs"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"{run_dir / WEIGHTS_FILE} is damaged" in trained.stdout and "writing it again from the newest verified checkpoint" in trained.stdout
    assert weight_values(run_dir / WEIGHTS_FILE) == weights and read_run_info(run_dir)["status"] == "complete"


def test_a_run_of_the_earlier_decoder_is_named_with_the_way_forward(tiny_run, tmp_path):
    """A run trained before grid positions (its config.yaml has no model.grid_positions) cannot be loaded: one line says so."""
    cfg, original = tiny_run
    run_dir = tmp_path / "runs" / original.name
    shutil.copytree(original, run_dir)
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text("".join(line for line in config.splitlines(keepends=True) if "grid_positions" not in line))
    weights = (run_dir / WEIGHTS_FILE).read_bytes()

    evaluated = _run("evaluate.py", "--run", run_dir, "--out", tmp_path / "report", cwd=tmp_path)
    assert evaluated.returncode == 2 and "Traceback" not in evaluated.stderr
    assert f"error: {run_dir}: trained by an earlier version of caption_tf's decoder" in evaluated.stderr
    assert "Train it again with this version" in evaluated.stderr
    assert (run_dir / WEIGHTS_FILE).read_bytes() == weights  # nothing the user owns is touched


def test_a_run_name_is_a_name_and_foreign_folders_are_left_alone(tmp_path, capsys):
    from caption_tf.cli import main_guard, train_main

    foreign = tmp_path / "runs" / "my-notes"
    foreign.mkdir(parents=True)
    (foreign / "history.csv").write_text("my own file\n")
    for run_name, expected in [(str(tmp_path / "elsewhere"), "is not a plain name"), ("my-notes", "is not a caption_tf run folder")]:
        flags = cli_flags(tiny_overrides(tmp_path, run_name=run_name))
        with pytest.raises(SystemExit) as stop:
            main_guard(lambda: train_main(flags))
        err = capsys.readouterr().err
        assert stop.value.code == 2 and expected in err and err.count("\n") == 1
    assert sorted(p.name for p in foreign.iterdir()) == ["history.csv"] and (foreign / "history.csv").read_text() == "my own file\n"
    assert not (tmp_path / "elsewhere").exists()


def test_a_transformer_run_named_with_its_attention_by_an_earlier_version_is_found_again(tmp_path):
    """Transformer runs were named `...-transformer-bahdanau`; the same command still finds such a run, not a new folder."""
    flags = cli_flags(tiny_overrides(tmp_path, decoder="transformer", num_images=20))
    first = _run("train.py", "--preset", "minimal", *flags, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = tmp_path / "runs"
    assert [p.name for p in runs.iterdir() if p.is_dir()] == ["minimal-shapes-mobilenet_v3_small-transformer"]

    earlier = runs / "minimal-shapes-mobilenet_v3_small-transformer-bahdanau"  # what the earlier version wrote
    (runs / "minimal-shapes-mobilenet_v3_small-transformer").rename(earlier)
    weights = weight_values(earlier / WEIGHTS_FILE)
    again = _run("train.py", "--preset", "minimal", *flags, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Run folder: {earlier}" in again.stdout, again.stdout[-2000:]
    assert [p.name for p in runs.iterdir() if p.is_dir()] == [earlier.name]  # no second run started
    assert weight_values(earlier / WEIGHTS_FILE) == weights and read_run_info(earlier)["status"] == "complete"
