import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caption_tf.config import DataConfig, FeatureConfig
from caption_tf.data.datasets import load_dataset
from caption_tf.training.pipeline import batch_count, caption_batches, captions_table
from caption_tf.features.backbones import BACKBONES, BackboneWeightsError, build_backbone, build_extractor
from caption_tf.features.cache import FeatureCacheError, build_feature_cache, open_cache, repair_cache


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return load_dataset(DataConfig(data_root=str(root), num_images=20, scene_size=48))


def _features(tmp_path, **kw):
    return FeatureConfig(**{"backbone": "mobilenet_v3_small", "weights": "none", "input_size": 48,
                            "cache_dir": str(tmp_path / "cache"), "shard_size": 6, **kw})


def test_cache_is_written_in_shards_with_a_manifest(dataset, tmp_path):
    cache = build_feature_cache(dataset, _features(tmp_path))
    manifest = json.loads((cache.directory / "manifest.json").read_text())
    assert manifest["backbone"] == "mobilenet_v3_small" and manifest["weights"] == "none"
    assert manifest["input_size"] == 48 and manifest["dataset_fingerprint"] == dataset.fingerprint()
    assert sum(manifest["splits"][s]["count"] for s in ("train", "val", "test")) == 20
    assert len(cache.shards("train")) == -(-manifest["splits"]["train"]["count"] // 6)
    split = cache.load_split("train")
    assert split["grid"].dtype == np.float16 and split["grid"].shape[1:] == cache.grid_shape
    # Standardised with statistics of the training images.
    grid = split["grid"].astype(np.float32)
    assert abs(grid.mean()) < 0.1 and 0.5 < grid.std() < 1.5
    np.testing.assert_allclose(split["pooled"], grid.mean(1), atol=2e-2)


def test_cache_is_reused_when_the_manifest_matches_and_rebuilt_when_not(dataset, tmp_path):
    cfg = _features(tmp_path)
    first = build_feature_cache(dataset, cfg)
    stamp = os.stat(first.directory / "manifest.json").st_mtime_ns
    again = build_feature_cache(dataset, cfg)
    assert again.directory == first.directory
    assert os.stat(again.directory / "manifest.json").st_mtime_ns == stamp  # not re-extracted
    # A stale manifest (e.g. written by an older version) is rebuilt in place.
    manifest = json.loads((first.directory / "manifest.json").read_text())
    manifest["format_version"] = -1
    (first.directory / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = build_feature_cache(dataset, cfg)
    assert rebuilt.manifest["format_version"] != -1
    # Another input size is another cache entry.
    other = build_feature_cache(dataset, _features(tmp_path, input_size=96))
    assert other.directory != first.directory and other.grid_shape != first.grid_shape


def test_unreadable_images_are_skipped_and_listed(dataset, tmp_path):
    import copy

    broken = copy.deepcopy(dataset)
    bad = broken.split("train")[0]
    bad.path = str(tmp_path / "broken.png")
    open(bad.path, "wb").write(b"\x89PNG\r\n\x1a\n not really a png")
    cache = build_feature_cache(broken, _features(tmp_path))
    assert bad.image_id not in cache.image_ids("train")
    assert [s["image_id"] for s in cache.skipped()] == [bad.image_id]
    assert "could not decode" in cache.skipped()[0]["reason"]


def test_pipeline_pairs_every_reference_with_its_image(dataset, tmp_path):
    cache = build_feature_cache(dataset, _features(tmp_path))
    ids = cache.image_ids("val")
    rows = [np.full((2 + i % 2, 5), i + 1, np.int32) for i in range(len(ids))]  # 2 or 3 refs, token = image no.
    ds = caption_batches(cache.shards("val"), cache.grid_shape, captions_table(rows, 5), batch_size=4)
    grids = cache.load_split("val")["grid"]
    seen = []
    for (grid, inputs), targets in ds:
        assert inputs.shape[1] == targets.shape[1] == 4
        for g, t in zip(grid.numpy(), inputs.numpy()):
            image = int(t[0]) - 1
            np.testing.assert_array_equal(g, grids[image])
            seen.append(image)
    assert sorted(seen) == sorted(i for i, r in enumerate(rows) for _ in range(len(r)))


def test_batches_grouped_by_image_hold_every_caption_of_an_image_once(dataset, tmp_path):
    cache = build_feature_cache(dataset, _features(tmp_path))
    ids = cache.image_ids("val")
    rows = [np.full((2 + i % 2, 5), i + 1, np.int32) for i in range(len(ids))]  # 2 or 3 refs, token = image no.
    rows[0] = rows[0][:0]  # an image without a caption is left out
    table = captions_table(rows, 5)
    ds = caption_batches(cache.shards("val"), cache.grid_shape, table, batch_size=2, shuffle=True, seed=3, group_by_image=True)
    grids = cache.load_split("val")["grid"]
    seen, batches = [], 0
    for (grid, inputs), targets in ds:
        batches += 1
        assert grid.shape[0] <= 2 and inputs.shape[1:] == targets.shape[1:] == (table[0].shape[1], 4)
        for g, refs in zip(grid.numpy(), inputs.numpy()):
            image = int(refs[0, 0]) - 1
            np.testing.assert_array_equal(g, grids[image])
            assert (refs[:, 0] > 0).sum() == len(rows[image])  # its captions, then empty slots
            seen.append(image)
    assert sorted(seen) == [i for i, r in enumerate(rows) if len(r)]
    assert batches == batch_count(table, 2, group_by_image=True) == -(-(len(ids) - 1) // 2)


def test_backbones_give_grids_and_pooled_vectors():
    for name in ("inception_v3", "densenet121"):
        assert name in BACKBONES
    extractor = build_extractor("densenet121", "none", 64)
    grid, pooled = extractor(np.zeros((2, 64, 64, 3), "float32"))
    assert tuple(grid.shape) == (2, 4, 1024) and tuple(pooled.shape) == (2, 1024)


def test_weights_from_a_local_file_round_trip(tmp_path):
    model = build_backbone("mobilenet_v3_small", "none", 48)
    path = tmp_path / "backbone.weights.h5"
    model.save_weights(path)
    loaded = build_backbone("mobilenet_v3_small", str(path), 48)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(BackboneWeightsError, match="no such file"):
        build_backbone("mobilenet_v3_small", str(tmp_path / "missing.weights.h5"), 48)


def refusing_port() -> int:
    """A local port nothing listens on: bound, then closed, so a connection to it is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_imagenet_offline_fails_with_the_way_out(monkeypatch, tmp_path):
    # Keras' real download (get_file -> urlretrieve), from a local address that refuses the connection.
    import keras.src.applications.mobilenet_v3 as mobilenet_v3
    import keras.src.backend.config as keras_config

    port = refusing_port()
    monkeypatch.setattr(mobilenet_v3, "BASE_WEIGHT_PATH", f"http://127.0.0.1:{port}/keras-applications/mobilenet_v3/")
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path / "keras-home"))  # no cached weights to fall back on
    with pytest.raises(BackboneWeightsError, match="--weights none") as info:
        build_backbone("mobilenet_v3_small", "imagenet", 48)
    message = str(info.value)
    assert f"URL fetch failure on http://127.0.0.1:{port}/" in message and "Connection refused" in message
    assert "--weights /path/to/backbone.weights.h5" in message


def test_user_images_of_any_mode_are_encoded(dataset, tmp_path):
    cfg = _features(tmp_path)
    cache = build_feature_cache(dataset, cfg)
    Image.new("L", (30, 50), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (80, 40), (255, 0, 0, 100)).save(tmp_path / "rgba.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    grids, ok = cache.encoder().encode([str(tmp_path / n) for n in ("gray.png", "rgba.png", "empty.jpg")])
    assert ok.tolist() == [True, True, False]
    assert grids.shape == (3, *cache.grid_shape) and grids.dtype == np.float16


def test_bfloat16_extraction_is_its_own_cache_entry_and_keeps_the_features(dataset, tmp_path):
    """`extract_precision: bfloat16` runs the backbone in bf16: another cache entry, the same information."""
    float32 = build_feature_cache(dataset, _features(tmp_path))
    bfloat16 = build_feature_cache(dataset, _features(tmp_path, extract_precision="bfloat16"))
    assert bfloat16.directory != float32.directory  # never mixed with (or mistaken for) float32 features
    assert bfloat16.manifest["encoder"]["precision"] == "bfloat16" and bfloat16.encoder_spec.precision == "bfloat16"
    assert bfloat16.encoder().extractor.backbone.compute_dtype == "bfloat16"
    a, b = (c.load_split("train")["grid"].astype(np.float32) for c in (float32, bfloat16))
    assert a.shape == b.shape and not np.array_equal(a, b)  # it did compute in bf16...
    # ...and kept the features: standardised grids within a few hundredths of a standard deviation.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999 and np.abs(a - b).mean() < 0.03


def test_extract_precision_auto_means_bfloat16_only_on_native_bf16_cpus(tmp_path):
    from caption_tf.features.backbones import cpu_has_native_bfloat16, resolve_extract_precision

    for flags, native in (("fpu sse2 avx2 avx512f", False), ("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_native_bfloat16(str(tmp_path / "cpuinfo")) is native
    assert cpu_has_native_bfloat16(str(tmp_path / "missing")) is False  # not Linux: no guess
    assert resolve_extract_precision("auto") == ("bfloat16" if cpu_has_native_bfloat16() else "float32")  # no GPU here
    assert resolve_extract_precision("float32") == "float32" and resolve_extract_precision("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="extract_precision must be 'auto', 'float32' or 'bfloat16', got 'fp16'"):
        resolve_extract_precision("fp16")


def test_a_random_backbone_is_the_same_whatever_ran_before():
    """--weights none: initialised from its own seed, so the cache, fine-tuning and new images share one backbone."""
    import random

    first = build_backbone("mobilenet_v3_small", "none", 48)
    random.random()  # whatever the process drew before...
    np.random.default_rng().random()
    state = random.getstate()
    again = build_backbone("mobilenet_v3_small", "none", 48)
    assert random.getstate() == state  # ...and building it draws nothing from the caller's stream
    for a, b in zip(first.get_weights(), again.get_weights()):
        np.testing.assert_array_equal(a, b)
    other = build_backbone("mobilenet_v3_small", "none", 48, seed=1)
    assert any(not np.array_equal(a, b) for a, b in zip(first.get_weights(), other.get_weights()))


def test_manifest_records_the_encoder_and_every_files_size_and_hash(dataset, tmp_path):
    from caption_tf.features.backbones import RANDOM_INIT_SEED
    from caption_tf.files import file_sha256

    cache = build_feature_cache(dataset, _features(tmp_path))
    assert cache.manifest["encoder"] == {"backbone": "mobilenet_v3_small", "weights": "none", "weights_tag": "none",
                                         "input_size": 48, "seed": RANDOM_INIT_SEED, "precision": "float32"}
    assert cache.manifest["seed"] == RANDOM_INIT_SEED  # part of the request: another seed is another entry
    shards = [Path(p).name for split in ("train", "val", "test") for p in cache.shards(split)]
    assert set(cache.manifest["files"]) == {"normalizer.npz", *shards}
    for name, entry in cache.manifest["files"].items():
        assert entry == {"bytes": (cache.directory / name).stat().st_size, "sha256": file_sha256(cache.directory / name)}
    assert cache.damaged() == []


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "flip":
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()


def test_damaged_shards_are_re_extracted_when_the_cache_is_reused(dataset, tmp_path, capsys):
    """Truncated, bit-flipped and deleted shards: found by size/SHA-256, rebuilt from their images, recorded."""
    cfg = _features(tmp_path)
    cache = build_feature_cache(dataset, cfg)
    before = {split: cache.load_split(split)["grid"].astype(np.float32) for split in ("train", "val")}
    damaged = {"train-00001.tfrecord": "truncate", "train-00002.tfrecord": "flip", "val-00000.tfrecord": "delete"}
    for name, how in damaged.items():
        _damage(cache.directory / name, how)
    assert {p["file"] for p in cache.damaged()} == set(damaged)
    capsys.readouterr()
    reused = build_feature_cache(dataset, cfg)
    printed = capsys.readouterr().out
    for name in damaged:
        assert f"Feature cache: {cache.directory / name} is damaged" in printed
    assert "re-extracting its 6 images" in printed and "extracting mobilenet_v3_small features" not in printed
    assert reused.damaged() == []
    assert {r["file"] for r in reused.manifest["repairs"]} == set(damaged)
    for split in ("train", "val"):  # the same features again (to float16 rounding: other batches)
        np.testing.assert_allclose(reused.load_split(split)["grid"].astype(np.float32), before[split], atol=2e-3, rtol=1e-3)


def test_damage_that_cannot_be_repaired_stops_naming_the_file(dataset, tmp_path):
    import copy

    cfg = _features(tmp_path)
    cache = build_feature_cache(dataset, cfg)
    # The statistics file: re-extracting shards cannot restore it (evaluation stops; training rebuilds the entry).
    _damage(cache.directory / "normalizer.npz", "truncate")
    with pytest.raises(FeatureCacheError, match=r"normalizer.npz: .*truncated.*delete .* and rerun train.py"):
        repair_cache(open_cache(cache.directory, {}), dataset)
    rebuilt = build_feature_cache(dataset, cfg)
    assert rebuilt.damaged() == [] and "repairs" not in rebuilt.manifest
    # A damaged shard whose image is gone.
    moved = copy.deepcopy(dataset)
    first = rebuilt.image_ids("test")[0]
    for record in moved.records:
        if record.image_id == first:
            record.path = str(tmp_path / "gone.png")
    _damage(rebuilt.directory / "test-00000.tfrecord", "truncate")
    with pytest.raises(FeatureCacheError, match=r"test-00000.tfrecord: damaged, and its image .*gone.png can no longer be read"):
        repair_cache(open_cache(rebuilt.directory, {}), moved)
