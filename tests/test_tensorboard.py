"""What `tensorboard --logdir runs` shows of a real `train.py` run, read back with TensorBoard's own event reader:
sample captions, attention grids, the HParams record, test BLEU, profiles; and curves that a kill and a resume
neither restart nor duplicate."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata

from caption_tf import console
from caption_tf.figures import attention_grid_size
from caption_tf.training import summaries
from conftest import REPO_ROOT, tiny_overrides, cli_flags

EPOCHS, STEPS_PER_EPOCH = 2, 10  # 32 training images x 5 captions / batch 16
TIMEOUT_S = 600


def train_py(tmp, name, *extra, env=None, **overrides):
    settings = tiny_overrides(tmp, epochs=EPOCHS, run_name=name, **overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "--preset", "minimal", *cli_flags(settings), *extra],
                          cwd=tmp, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)


def accumulator(log_dir) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(log_dir), size_guidance={event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0})
    acc.Reload()
    return acc


def text(event) -> str:
    return tf.make_ndarray(event.tensor_proto).item().decode()


def table_rows(markdown: str) -> dict[str, tuple[str, list[str]]]:
    """{image id: (caption, references)} from the Markdown table of the text dashboard."""
    rows = [line.strip("|").split(" | ") for line in markdown.splitlines()[2:]]
    return {image.strip(): (caption.strip(), refs.strip().split("<br>")) for image, caption, refs in rows}


@pytest.fixture(scope="module")
def shared_tmp(tmp_path_factory):
    """Data and feature cache shared by the runs of this module (the first run builds them)."""
    return tmp_path_factory.mktemp("tensorboard")


def test_train_py_logs_captions_attention_hparams_test_bleu_and_a_profile(shared_tmp):
    done = train_py(shared_tmp, "shown", "--profile-batches=2,3", "--tensorboard-images=2")
    assert done.returncode == 0, done.stderr[-3000:]
    # A quiet console: none of TensorFlow's C++ start-up notices (this machine prints several without the filter).
    assert not console.START_UP_NOISE.search(done.stderr), done.stderr[-2000:]
    run_dir = shared_tmp / "runs" / "shown"
    logs = run_dir / "logs"

    # Sample captions: one Markdown table per epoch, holding what the trained model decodes for those images.
    from caption_tf.data.datasets import load_dataset
    from caption_tf.data.text import clean_caption
    from caption_tf.evaluation.captioning import open_run_cache
    from caption_tf.run_folder import load_run

    validation = accumulator(logs / "validation")
    tables = validation.Tensors(summaries.CAPTIONS_TAG)
    assert [e.step for e in tables] == list(range(EPOCHS))
    run = load_run(run_dir)
    cache = open_run_cache(run)
    ids = cache.image_ids("val")[: summaries.SAMPLE_IMAGES]
    tokens, attention = run.generator().greedy(cache.load_split("val", ("grid",), limit=len(ids))["grid"])
    words = [run.vocab.step_words(row) for row in tokens.numpy()]
    rows = table_rows(text(tables[-1]))
    assert list(rows) == ids and len(ids) == 4  # the tiny dataset's 4 validation images
    assert [caption for caption, _ in rows.values()] == [" ".join(w) or "(empty)" for w in words]
    records = load_dataset(run.config.data).by_id()
    assert all(refs == [clean_caption(c) for c in records[i].captions] for i, (_, refs) in rows.items())

    # Attention grids: the first 2 samples (--tensorboard-images 2), each epoch, a PNG of the size of its caption's grid.
    image_tags = sorted(t for t in validation.Tags()["tensors"] if t.startswith(summaries.ATTENTION_TAG + "/"))
    assert image_tags == sorted(f"{summaries.ATTENTION_TAG}/{i}" for i in ids[:2])
    for k, image_id in enumerate(ids[:2]):
        images = validation.Tensors(f"{summaries.ATTENTION_TAG}/{image_id}")
        assert [e.step for e in images] == list(range(EPOCHS))
        width, height, png = tf.make_ndarray(images[-1].tensor_proto)  # the image plugin's format
        decoded = tf.io.decode_png(png).numpy()
        assert decoded.shape == (*attention_grid_size(len(words[k])), 3) and (int(height), int(width)) == decoded.shape[:2]
        assert decoded.std() > 10  # a picture, not a blank canvas

    # The HParams record holds the run's resolved settings; the test BLEU beside it is the run's metrics.json.
    root = accumulator(logs)
    info = hparams_metadata.parse_session_start_info_plugin_data(root.SummaryMetadata("_hparams_/session_start_info").plugin_data.content)
    hparams = {k: v.string_value or v.number_value for k, v in info.hparams.items()}
    cfg, vocab = run.config, json.loads((run_dir / "vocab.json").read_text())
    assert hparams == {
        "preset": "minimal", "dataset": "shapes", "backbone": "mobilenet_v3_small", "weights": "none", "decoder": "lstm",
        "attention": "bahdanau", "embedding_dim": 16, "units": 32, "dropout": 0.0, "vocab_size": len(vocab["tokens"]),
        "max_length": cfg.text.max_length, "batch_size": 16, "learning_rate": cfg.train.learning_rate, "lr_schedule": "constant",
        "precision": "float32", "replicas": 1, "fine_tune_layers": 0,
    }
    assert info.group_name == "shown"
    experiment = hparams_metadata.parse_experiment_plugin_data(root.SummaryMetadata("_hparams_/experiment").plugin_data.content)
    metrics = {(m.name.group, m.name.tag): m.display_name for m in experiment.metric_infos}
    assert metrics[("validation", "epoch_loss")] == "val loss" and metrics[("validation", "epoch_bleu4")] == "val BLEU-4"
    test = accumulator(logs / "test")
    scores = json.loads((run_dir / "metrics.json").read_text())["greedy"]
    for n in range(1, 5):
        (point,) = test.Tensors(f"epoch_bleu{n}")
        assert point.step == EPOCHS - 1 and float(tf.make_ndarray(point.tensor_proto)) == pytest.approx(scores[f"bleu{n}"])
    assert [e.step for e in validation.Tensors("epoch_bleu4")] == list(range(EPOCHS))  # val BLEU-4, the curve beside it

    # --profile-batches 2,3: a trace for the Profile tab.
    assert list((logs / "train" / "plugins" / "profile").glob("*/*.xplane.pb"))


def steps_by_tag(log_dir: Path) -> dict[str, list[int]]:
    """{tag: steps} of every summary in the event files directly in `log_dir`, in the order the files were written."""
    steps: dict[str, list[int]] = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                steps.setdefault(value.tag, []).append(event.step)
    return steps


def flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_killed_and_resumed_run_continues_every_curve_without_repeating_a_step(shared_tmp):
    # SIGKILL after 14 batches, with epoch 1 logged and flushed; the two newest checkpoints (steps 12 and 10)
    # damaged as by a kill during their write: training resumes from step 9, inside epoch 1, whose end the
    # killed process had already logged.
    settings = dict(checkpoint_every=3, tensorboard_images=1)  # its image steps must not repeat either
    killed = train_py(shared_tmp, "resumed", "--no-async-checkpoint", env={"CAPTION_TF_CRASH_AFTER_BATCHES": "14"}, **settings)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run_dir = shared_tmp / "runs" / "resumed"
    assert steps_by_tag(run_dir / "logs" / "validation")["epoch_loss"] == [0]  # logged before the kill
    assert 10 in steps_by_tag(run_dir / "logs")["health/ram_percent"]  # the epoch end's health sample too
    for step in (12, 10):
        flip_a_byte(next((run_dir / "checkpoints").glob(f"ckpt-{step}.data-*")))

    resumed = train_py(shared_tmp, "resumed", "--verbose", **settings)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Checkpoint quarantined" in resumed.stdout and "ckpt-9: epoch 1, 9 batch(es) done" in resumed.stdout

    final_step = EPOCHS * STEPS_PER_EPOCH
    for folder in ("", "train", "validation", "test"):
        for tag, steps in steps_by_tag(run_dir / "logs" / folder).items():
            assert steps == sorted(set(steps)), f"logs/{folder} {tag}: steps {steps} repeat or go back"
            assert steps[-1] <= (EPOCHS - 1 if tag.startswith("epoch_") else final_step), (folder, tag, steps)
    validation = steps_by_tag(run_dir / "logs" / "validation")
    assert validation["epoch_loss"] == validation[summaries.CAPTIONS_TAG] == [0, 1]
    health = steps_by_tag(run_dir / "logs")["health/ram_percent"]
    assert health[0] == 0 and 10 in health and health[-1] == final_step  # step 10 (dropped past step 9) logged again, once
    assert steps_by_tag(run_dir / "logs")["_hparams_/session_start_info"] == [0]  # one record, kept across the resume


def test_trim_drops_what_was_logged_past_a_resume_point_and_a_truncated_record(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        for step in range(6):
            tf.summary.scalar("health/ram_percent", 1.0, step=10 * step)  # the batch-step axis: steps 0..50
        for epoch in range(3):
            tf.summary.scalar("epoch_loss", 1.0, step=epoch)
            tf.summary.text("epoch_captions", "a red circle", step=epoch)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    path.write_bytes(path.read_bytes()[:-7])  # a writer killed in the middle of its last record

    assert summaries.trim_events(tmp_path, epochs=2, last_step=20) == 3 + 1  # health 30, 40, 50; epoch 2 (loss; its caption was cut)
    steps = steps_by_tag(tmp_path)  # summary_iterator raises on a truncated record: the file is whole again
    assert steps == {"health/ram_percent": [0, 10, 20], "epoch_loss": [0, 1], "epoch_captions": [0, 1]}
    assert summaries.trim_events(tmp_path, epochs=0, last_step=-1) == 7 and not list(tmp_path.glob("events.out.tfevents.*"))


def test_markdown_table_escapes_and_renders_in_tensorboard():
    from tensorboard.plugin_util import markdown_to_safe_html

    table = summaries.markdown_table(["a|b.jpg"], [""], [["a red circle", "a red | circle"]], epoch=4)
    html = markdown_to_safe_html(table)
    assert "<table>" in html and "greedy caption, epoch 5" in html and "<br" in html and "(empty)" in html
    assert html.count("<td>") == 3  # the | in the id and the reference did not split cells


def test_quiet_console_drops_start_up_notices_and_keeps_other_lines(capfd):
    with console.filtered_stderr():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"E0000 00:00:1.0 123 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n")
        os.write(2, b"E0000 real trouble: could not open file\n")
    assert capfd.readouterr().err == "E0000 real trouble: could not open file\n"


def test_console_imports_tensorflow_without_its_notices():
    code = "from caption_tf.console import import_tensorflow; tf = import_tensorflow(False); print(tf.constant(2).numpy())"
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "2"
    assert not console.START_UP_NOISE.search(done.stderr), done.stderr
