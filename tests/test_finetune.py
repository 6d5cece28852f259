"""Two-phase training on tiny data: what phase 2 changes, where it writes, how it resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides

from caption_tf.config import load_config
from caption_tf.features.backbones import build_backbone
from caption_tf.training import finetune
from caption_tf.training.finetune import BACKBONE_WEIGHTS_FILE, PHASE1_WEIGHTS_FILE, train_in_phases, unfreeze_last_layers

BACKBONE, SIZE, LAYERS = "mobilenet_v3_small", 32, 12


def layer_weights(path):
    backbone = build_backbone(BACKBONE, str(path), SIZE)
    return backbone, {layer.name: [w.copy() for w in layer.get_weights()] for layer in backbone.layers if layer.weights}


def changed(before, after, name):
    return any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))


def test_unfreeze_keeps_batchnorm_and_earlier_layers_frozen():
    backbone = build_backbone(BACKBONE, "none", SIZE)
    names = unfreeze_last_layers(backbone, LAYERS)
    last = backbone.layers[-LAYERS:]
    assert names and set(names) <= {layer.name for layer in last}
    assert all(not layer.trainable for layer in backbone.layers[:-LAYERS])
    assert all(not layer.trainable for layer in backbone.layers if layer.__class__.__name__ == "BatchNormalization")
    with pytest.raises(ValueError, match="fine-tune-layers"):
        unfreeze_last_layers(backbone, -1)


@pytest.fixture(scope="module")
def fine_tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    init = tmp / "init.weights.h5"
    build_backbone(BACKBONE, "none", SIZE).save_weights(init)
    cfg = load_config(
        "minimal",
        tiny_overrides(
            tmp,
            num_images=20,
            input_size=SIZE,
            weights=str(init),
            fine_tune_layers=LAYERS,
            fine_tune_epochs=1,
            fine_tune_learning_rate=1e-3,
            fine_tune_batch_size=8,
        ),
    )
    run_dir = train_in_phases(cfg)
    return cfg, run_dir, init


def test_phase2_changes_only_the_last_layers_and_writes_the_run(fine_tuned):
    cfg, run_dir, init = fine_tuned
    backbone, before = layer_weights(init)
    _, after = layer_weights(run_dir / BACKBONE_WEIGHTS_FILE)
    info = json.loads((run_dir / "run.json").read_text())
    unfrozen = info["phases"]["fine_tune"]["unfrozen_layers"]
    assert unfrozen and all(changed(before, after, name) for name in unfrozen)
    untouched = [name for name in before if name not in unfrozen]
    assert untouched and not any(changed(before, after, name) for name in untouched)
    # The run now points at the fine-tuned backbone and its own feature cache.
    saved = load_config(str(run_dir / "config.yaml"))
    assert saved.features.weights == str((run_dir / BACKBONE_WEIGHTS_FILE).resolve())
    assert info["feature_cache"] == info["phases"]["fine_tune"]["feature_cache"] != info["phases"]["decoder"]["feature_cache"]
    assert (run_dir / PHASE1_WEIGHTS_FILE).exists() and (run_dir / "history_fine_tune.csv").exists()


def test_evaluation_captions_the_fine_tuned_backbones_features(fine_tuned):
    from caption_tf.data.datasets import load_dataset
    from caption_tf.evaluation.captioner import Captioner
    from caption_tf.evaluation.captioning import evaluate_run, open_run_cache
    from caption_tf.features.cache import MANIFEST, FeatureCache

    _, run_dir, _ = fine_tuned
    metrics = evaluate_run(run_dir)
    captioner = Captioner.from_run(run_dir)
    cache = open_run_cache(captioner.run)
    ids = cache.image_ids("test")
    records = load_dataset(captioner.run.config.data).by_id()
    paths = [records[i].path for i in ids]
    # The test images as files, through the fine-tuned backbone: the features evaluate_run read ...
    grids, ok = captioner.encoder.encode(paths)
    assert ok.all() and metrics["images"] == len(ids) > 0
    np.testing.assert_allclose(cache.load_split("test")["grid"].astype(np.float32), grids.astype(np.float32), atol=2e-2, rtol=1e-2)
    # ... which are not phase 1's ...
    phase1_dir = Path(json.loads((run_dir / "run.json").read_text())["phases"]["decoder"]["feature_cache"])
    phase1 = FeatureCache(phase1_dir, json.loads((phase1_dir / MANIFEST).read_text())).load_split("test")["grid"]
    assert np.abs(phase1.astype(np.float32) - grids.astype(np.float32)).max() > 0.1
    # ... and the captions it scored are the fine-tuned model's captions of those files.
    captions = {r.path: r.greedy for r in captioner.caption(paths)}
    assert [e["caption"] for e in metrics["examples"]] == [captions[records[e["image_id"]].path] for e in metrics["examples"]]


def test_rerun_after_a_phase2_crash_resumes_phase2_only(fine_tuned, monkeypatch, capsys):
    cfg, run_dir, _ = fine_tuned
    info = json.loads((run_dir / "run.json").read_text())
    del info["phases"]["fine_tune"]  # as if phase 2 had crashed before its marker
    (run_dir / "run.json").write_text(json.dumps(info))
    phase1_mtime = (run_dir / PHASE1_WEIGHTS_FILE).stat().st_mtime
    calls = []
    original = finetune.fine_tune
    monkeypatch.setattr(finetune, "fine_tune", lambda c, d: calls.append(d) or original(c, d))
    train_in_phases(cfg)
    assert "Phase 1 (decoder) already complete" in capsys.readouterr().out
    assert calls == [run_dir] and (run_dir / PHASE1_WEIGHTS_FILE).stat().st_mtime == phase1_mtime
    assert json.loads((run_dir / "run.json").read_text())["phases"]["fine_tune"]["status"] == "complete"
    train_in_phases(cfg)  # everything complete: nothing runs
    assert calls == [run_dir]


def test_phase2_continues_the_phase1_curves_in_tensorboard(fine_tuned):
    """Phase 2 (and its rerun above) log after phase 1 on the same axes, in the same folders: no curve restarts."""
    from caption_tf.training.summaries import CAPTIONS_TAG, scalar_steps

    _, run_dir, _ = fine_tuned
    logs = run_dir / "logs"
    phase1_steps = json.loads((run_dir / "run.json").read_text())["steps_run"]
    assert scalar_steps(logs / "train", "epoch_loss") == [0, 1]  # phase 1's epoch, then phase 2's
    assert scalar_steps(logs / "validation", "epoch_loss") == scalar_steps(logs / "validation", CAPTIONS_TAG) == [0, 1]
    health = scalar_steps(logs, "health/ram_percent")
    assert health == sorted(set(health)) and health[0] == 0 and phase1_steps in health and health[-1] > phase1_steps
    assert not (logs / "fine_tune").exists()
