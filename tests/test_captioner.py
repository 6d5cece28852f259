"""Captioning image files with a trained run (issue 14) and reproducible runs (issue 12, hole 3).

A test image passed as a file must get exactly the caption its feature-cache
record gets: same backbone (a random one rebuilt from its recorded seed, or the
same weights file), same preprocessing, same standardisation.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from caption_tf.evaluation.captioner import Captioner
from conftest import REPO_ROOT, tiny_overrides

# Enough training (4 epochs at lr 0.01, ~20 s here) for the tiny decoder to name colours and shapes,
# so that different images get different captions and a wrong encoding shows. With the deep output
# layer (`--deep-output`, opt-in): a run folder must rebuild it for `evaluate.py` and the Captioner.
TRAINED = {"epochs": 4, "learning_rate": 0.01, "deep_output": True}


def _train(tmp: Path, **extra) -> Path:
    from caption_tf.config import load_config
    from caption_tf.training.trainer import train

    return train(load_config("minimal", tiny_overrides(tmp, **extra)))


@pytest.fixture(scope="module")
def two_runs_one_command(tmp_path_factory):
    """The same command twice: first on a fresh feature cache, then with the cache already there."""
    tmp = tmp_path_factory.mktemp("same_command")
    fresh = _train(tmp, run_name="fresh", **TRAINED)
    reused = _train(tmp, run_name="reused", **TRAINED)
    return fresh, reused


def _test_split(run_dir: Path):
    """(image ids, image paths, cached grids) of the run's test split."""
    from caption_tf.data.datasets import load_dataset
    from caption_tf.evaluation.captioning import open_run_cache
    from caption_tf.run_folder import load_run

    run = load_run(run_dir, with_model=False)
    dataset = load_dataset(run.config.data)
    cache = open_run_cache(run, dataset)
    ids, records = cache.image_ids("test"), dataset.by_id()
    return ids, [records[i].path for i in ids], cache.load_split("test")["grid"]


def test_same_command_same_decoder_on_a_fresh_or_a_reused_cache(two_runs_one_command):
    """Issue 12, hole 3: building the backbone for a fresh cache used to shift the decoder's initialisation."""
    from caption_tf.run_folder import WEIGHTS_FILE, read_run_info

    fresh, reused = two_runs_one_command
    assert read_run_info(fresh)["feature_cache"] == read_run_info(reused)["feature_cache"]
    assert weight_arrays(fresh / WEIGHTS_FILE) == weight_arrays(reused / WEIGHTS_FILE)
    with h5py.File(fresh / WEIGHTS_FILE, "r") as fh:
        names = []
        fh.visit(names.append)
    assert any("deep_output" in name for name in names), names


def weight_arrays(path: Path) -> list[bytes]:
    """The arrays of a .weights.h5 file, in a canonical order (layer names differ between models of one process)."""
    values = []
    with h5py.File(path, "r") as fh:
        fh.visititems(lambda name, obj: values.append(obj[()].tobytes()) if isinstance(obj, h5py.Dataset) else None)
    return sorted(values)


def test_evaluate_images_gives_test_images_their_cache_captions(two_runs_one_command, tmp_path):
    """evaluate.py --images on the test split's own files (weights none) = the captions decoded from the cache."""
    run_dir, _ = two_runs_one_command
    ids, paths, grids = _test_split(run_dir)
    out = tmp_path / "report"
    command = [sys.executable, "evaluate.py", "--run", str(run_dir), "--images", *paths, "--out", str(out)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from_files = {item["path"]: item for item in json.loads((out / "metrics.json").read_text())["user_images"][run_dir.name]}
    from_cache = Captioner.from_run(run_dir).caption_grids(grids)  # what the report decodes for the split
    for decoding in ("greedy", "beam"):
        assert [from_files[p][decoding] for p in paths] == [c[decoding] for c in from_cache]
    greedy = [from_files[p]["greedy"] for p in paths]
    assert len(set(greedy)) > 1, f"every image got the same caption: {greedy}"
    # The console says which decoding each caption is; the small report does not claim a split.
    first = f"{run_dir.name}: {paths[0]}\n  greedy: {greedy[0]}\n  beam (beam size 3): {from_files[paths[0]]['beam']}\n"
    assert first in done.stdout
    page = (out / "report.html").read_text()
    assert "split <b>" not in page and f"captions of {len(paths)} image file(s)" in page


def test_captioner_api_returns_both_decodings_with_attention(two_runs_one_command, tmp_path):
    run_dir, _ = two_runs_one_command
    ids, paths, grids = _test_split(run_dir)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    gray = tmp_path / "gray.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70), dtype=np.uint8), mode="L").save(gray)
    captioner = Captioner.from_run(run_dir, beam_size=2)
    results = captioner.caption([paths[0], str(broken), str(gray), paths[1]])
    assert [r.path for r in results] == [paths[0], str(broken), str(gray), paths[1]]
    assert not results[1].ok and "broken.jpg" in results[1].error and results[1].greedy == ""
    cached = captioner.caption_grids(grids[:2])
    for result, expected in zip((results[0], results[3]), cached):
        assert result.ok and result.greedy == expected["greedy"] and result.beam == expected["beam"]
    for result in (results[0], results[2], results[3]):
        assert result.greedy == " ".join(result.greedy_words) and result.beam == " ".join(result.beam_words)
        cells = grids.shape[1]
        assert result.greedy_attention.shape == (len(result.greedy_words), cells)
        assert result.beam_attention.shape == (len(result.beam_words), cells)
        np.testing.assert_allclose(result.greedy_attention.sum(-1), 1.0, atol=1e-4)
        assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
        assert np.isfinite(result.beam_score)


def test_no_repeat_ngram_comes_from_the_run_or_the_caller_and_holds_in_both_decodings(two_runs_one_command):
    run_dir, _ = two_runs_one_command
    _, _, grids = _test_split(run_dir)
    default = Captioner.from_run(run_dir)  # the run's eval settings: no n-gram ban, no repeated mention by default
    assert default.no_repeat_ngram == 0 and default.block_repeated_mentions
    assert not Captioner.from_run(run_dir, block_repeated_mentions=False).generator.block_repeated_mentions
    blocked = Captioner.from_run(run_dir, no_repeat_ngram=1)
    assert blocked.generator.no_repeat_ngram == 1
    for item in blocked.caption_grids(grids):
        for decoding in ("greedy", "beam"):
            words = item[f"{decoding}_words"]
            assert words and len(words) == len(set(words)), words  # n = 1: no word twice
            assert len(item[f"{decoding}_attention"]) == len(words)


def test_a_run_on_a_backbone_weights_file_encodes_files_like_its_cache(tmp_path):
    """--weights PATH: the file is recorded with the run (path + SHA-256) and reloaded to encode new images."""
    from caption_tf.features.backbones import BackboneWeightsError, build_backbone

    weights = tmp_path / "backbone.weights.h5"
    build_backbone("mobilenet_v3_small", "none", 64, seed=7).save_weights(weights)
    run_dir = _train(tmp_path, weights=str(weights), run_name="file-weights", epochs=1)
    ids, paths, grids = _test_split(run_dir)
    captioner = Captioner.from_run(run_dir)
    spec = captioner.encoder.spec
    assert spec.weights == str(weights.resolve()) and spec.weights_tag.startswith("file-")
    encoded, ok = captioner.encoder.encode(paths)
    assert ok.all()
    # Equal to float16 rounding (the backbone ran in other batches than at extraction), nowhere more.
    np.testing.assert_allclose(encoded.astype(np.float32), grids.astype(np.float32), atol=2e-3, rtol=1e-3)
    decoded = [(c["greedy"], c["beam"]) for c in captioner.caption_grids(encoded)]
    assert decoded == [(c["greedy"], c["beam"]) for c in captioner.caption_grids(grids)]
    # A changed weights file is refused, naming it: the features would no longer match the decoder.
    build_backbone("mobilenet_v3_small", "none", 64, seed=8).save_weights(weights)
    with pytest.raises(BackboneWeightsError, match="backbone.weights.h5: backbone weights changed"):
        spec.build_extractor()


def test_a_run_extracted_in_bfloat16_encodes_new_images_in_bfloat16(tmp_path):
    """New images must go through the backbone the cache came from, its precision included."""
    from caption_tf.features.encoder import EncoderSpec, ImageEncoder

    run_dir = _train(tmp_path, extract_precision="bfloat16", run_name="bf16", epochs=1)
    ids, paths, grids = _test_split(run_dir)
    captioner = Captioner.from_run(run_dir)
    assert captioner.encoder.spec.precision == "bfloat16"
    encoded, ok = captioner.encoder.encode(paths)
    assert ok.all()
    error = np.abs(encoded.astype(np.float32) - grids.astype(np.float32)).max()
    # The same backbone in float32 is further from the cache than a bf16 rerun in other batches.
    float32 = ImageEncoder(dataclasses.replace(captioner.encoder.spec, precision="float32"), captioner.encoder.normalizer)
    float32_error = np.abs(float32.encode(paths)[0].astype(np.float32) - grids.astype(np.float32)).max()
    assert error <= 2e-3 < 0.05 < float32_error, (error, float32_error)
    spec = EncoderSpec.from_dict({k: v for k, v in captioner.encoder.spec.to_dict().items() if k != "precision"})
    assert spec.precision == "float32"  # caches and runs from before the setting were extracted in float32


def test_training_on_a_cache_with_a_truncated_shard_re_extracts_it(two_runs_one_command, capsys):
    """Issue 12, hole 7: a damaged shard used to be reused and kill the run with a raw DataLossError."""
    from caption_tf.run_folder import read_run_info

    fresh, _ = two_runs_one_command
    cache = Path(read_run_info(fresh)["feature_cache"])
    shard = cache / "train-00000.tfrecord"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    capsys.readouterr()
    run_dir = _train(fresh.parent.parent, run_name="after-damage", epochs=1)
    printed = capsys.readouterr().out
    assert f"Feature cache: {shard} is damaged" in printed and "re-extracting its" in printed
    assert read_run_info(run_dir)["status"] == "complete"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert [r["file"] for r in manifest["repairs"]] == ["train-00000.tfrecord"]


def test_a_run_from_before_seeded_backbones_is_still_evaluated_but_not_fed_new_images(tiny_run, tmp_path):
    """A run and cache written before issue 14 (cache format 2: no encoder, no file hashes)."""
    import shutil

    from caption_tf.data.datasets import load_dataset
    from caption_tf.evaluation.captioning import open_run_cache
    from caption_tf.run_folder import FEATURE_NORMALIZER_FILE, RunFolderError, load_run, read_run_info, write_run_info

    _, original = tiny_run
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    shutil.copytree(original, run_dir)
    shutil.copytree(read_run_info(original)["feature_cache"], cache_dir)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    for key in ("encoder", "files", "seed", "shard_size"):
        del manifest[key]
    manifest["format_version"] = 2
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    info = read_run_info(run_dir)
    del info["encoder"]
    write_run_info(run_dir, {**info, "feature_cache": str(cache_dir)})
    (run_dir / FEATURE_NORMALIZER_FILE).unlink()

    run = load_run(run_dir)
    cache = open_run_cache(run, load_dataset(run.config.data))  # the split is still evaluated from its cache
    assert cache.directory == cache_dir and len(Captioner(run).caption_grids(cache.load_split("test")["grid"])) == 4
    with pytest.raises(RunFolderError, match="trained before random backbones were seeded"):
        Captioner(run).caption([str(tmp_path / "any.jpg")])
