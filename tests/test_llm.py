"""LLM captioner: tiny randomly initialised models saved locally, loaded through the real code.

No network: HF_HUB_OFFLINE=1 for every test, tokenizers built from a vocabulary written here.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere

# Pinned requirements (requirements.txt; tokenizers comes with transformers): missing, the suite fails.
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from caption_tf.data.text import clean_caption  # noqa: E402
from caption_tf.evaluation.llm import (  # noqa: E402
    LLMCaptioner,
    LLMSettings,
    LLMUnavailable,
    UnsupportedLLM,
    llm_column,
)

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "a", "red", "circle", "blue", "square", "on", "the", "left"]
PAD, UNK, BOS, EOS = range(4)
TINY_IMAGE = 32
TINY_LAYERS = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TINY_VISION = dict(image_size=TINY_IMAGE, patch_size=8, **TINY_LAYERS)
MISSING_MODEL = "caption-tf-tests/no-such-captioner"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_tokenizer(**special):
    vocab = {w: i for i, w in enumerate(WORDS)}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>", **special
    )


@pytest.fixture(scope="module")
def vit_gpt2_dir(tmp_path_factory):
    """A ViT encoder + GPT-2 decoder captioner, ~50k parameters."""
    folder = tmp_path_factory.mktemp("vit_gpt2")
    encoder = transformers.ViTConfig(**TINY_VISION)
    decoder = transformers.GPT2Config(vocab_size=len(WORDS), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                      add_cross_attention=True, bos_token_id=BOS, eos_token_id=EOS)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    # Like GPT-2 captioners: no pad token in the config, the captioner must supply one.
    config.decoder_start_token_id, config.eos_token_id = BOS, EOS
    torch.manual_seed(0)
    transformers.VisionEncoderDecoderModel(config=config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE}).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("blip")
    text = dict(vocab_size=len(WORDS), max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                pad_token_id=PAD, sep_token_id=EOS, **TINY_LAYERS)
    config = transformers.BlipConfig(vision_config=TINY_VISION, text_config=text, projection_dim=32)
    torch.manual_seed(0)
    transformers.BlipForConditionalGeneration(config).save_pretrained(folder)
    image_processor = transformers.BlipImageProcessor(size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    tokenizer = tiny_tokenizer(sep_token="</s>", cls_token="<s>")
    transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def git_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("git")
    config = transformers.GitConfig(vision_config=TINY_VISION, vocab_size=len(WORDS), max_position_embeddings=64,
                                    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, **TINY_LAYERS)
    torch.manual_seed(0)
    transformers.GitForCausalLM(config).save_pretrained(folder)
    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                                      crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE})
    tokenizer = tiny_tokenizer(sep_token="</s>", cls_token="<s>")
    transformers.GitProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """RGB JPEG, grayscale PNG, RGBA PNG (different sizes), as the loaders see them."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = [folder / "rgb.jpg", folder / "gray.png", folder / "rgba.png"]
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (33, 47), dtype=np.uint8), mode="L").save(paths[1])
    Image.fromarray(rng.integers(0, 255, (64, 30, 4), dtype=np.uint8), mode="RGBA").save(paths[2])
    return [str(p) for p in paths]


def check_result(result, paths, num_beams, max_length):
    assert list(result.captions) == paths
    assert all(isinstance(c, str) for c in result.captions.values())
    for raw, clean in zip(result.raw_captions.values(), result.captions.values()):
        assert clean == clean_caption(raw)  # the references' normaliser
        # Tiny word-level vocabulary: a word per token, so max_length bounds the words.
        assert len(clean.split()) <= max_length - 1
    res = result.resources
    assert res["images"] == len(paths) and res["num_beams"] == num_beams and res["max_length"] == max_length
    assert res["parameters"] > 0
    assert res["latency_ms_mean"] > 0 and res["latency_ms_p95"] >= res["latency_ms_p50"] > 0
    assert res["throughput_images_per_s"] > 0
    assert res["peak_memory_mb"] > 0 and res["memory_delta_mb"] >= 0
    assert res["source"] == "local folder"


@pytest.mark.parametrize("fixture, kind", [("vit_gpt2_dir", "vision-encoder-decoder"), ("blip_dir", "blip"),
                                           ("git_dir", "git")])
def test_caption_tiny_models_by_path(request, images, fixture, kind):
    captioner = LLMCaptioner.load(str(request.getfixturevalue(fixture)), device="auto")
    assert captioner.kind == kind and captioner.device == ("cuda" if torch.cuda.is_available() else "cpu")
    assert str(next(captioner.model.parameters()).device).startswith(captioner.device)
    assert captioner.num_parameters == sum(p.numel() for p in captioner.model.parameters())
    beam = captioner.caption(images, batch_size=2, num_beams=3, max_length=6)
    check_result(beam, images, num_beams=3, max_length=6)
    assert beam.resources["device"] == captioner.device and beam.resources["kind"] == kind
    greedy = captioner.caption(images, batch_size=3, num_beams=1, max_length=4)
    check_result(greedy, images, num_beams=1, max_length=4)


def test_unreadable_image_is_skipped_with_reason(vit_gpt2_dir, images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    result = LLMCaptioner.load(str(vit_gpt2_dir), device="cpu").caption([images[0], str(broken)], num_beams=1)
    assert list(result.captions) == [images[0]]
    assert result.skipped[0]["path"] == str(broken) and "broken.jpg" in result.skipped[0]["reason"]
    assert result.resources["images_skipped"] == 1


def test_missing_model_offline_names_model_and_fix():
    start = time.perf_counter()
    with pytest.raises(LLMUnavailable) as info:
        LLMCaptioner.load(MISSING_MODEL)
    message = str(info.value)
    assert MISSING_MODEL in message and "cache" in message
    assert f"hf download {MISSING_MODEL}" in message and "--llm /path/to/folder" in message
    assert time.perf_counter() - start < 10


def test_unreachable_hub_fails_fast_without_offline_flag(monkeypatch):
    # A closed local port stands in for "no network": refused at once, never a real request.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(LLMUnavailable, match="no network.*127.0.0.1:9") as info:
        LLMCaptioner.load(MISSING_MODEL)
    assert MISSING_MODEL in str(info.value)
    assert time.perf_counter() - start < 10


def test_missing_folder_and_non_model_folder(tmp_path):
    with pytest.raises(LLMUnavailable, match="not found"):
        LLMCaptioner.load(str(tmp_path / "nowhere"))
    with pytest.raises(LLMUnavailable, match="no config.json"):
        LLMCaptioner.load(str(tmp_path))


def test_unsupported_model_family(tmp_path):
    transformers.BertConfig(**TINY_LAYERS).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedLLM, match="'bert'.*supported: blip, git, vision-encoder-decoder") as info:
        LLMCaptioner.load(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_llm_column_unavailable_offline(images):
    column = llm_column(MISSING_MODEL, {"img": images[0]}, LLMSettings(num_beams=1))
    assert column["available"] is False and MISSING_MODEL in column["reason"]


def test_llm_column_keys_captions_by_image_id(vit_gpt2_dir, images):
    ids = {"id_rgb": images[0], "id_gray": images[1], "id_rgba": images[2]}
    column = llm_column(str(vit_gpt2_dir), ids, {"num_beams": 2, "max_length": 5, "batch_size": 2}, device="cpu")
    assert column["available"] is True
    assert set(column["captions"]) == set(ids) and column["skipped"] == []
    assert column["resources"]["num_beams"] == 2 and column["resources"]["images"] == 3


def test_settings_from_config():
    from caption_tf.config import Config

    cfg = Config()
    cfg.eval.beam_size, cfg.text.max_length, cfg.eval.eval_batch_size = 5, 12, 7
    assert LLMSettings.coerce(cfg) == LLMSettings(num_beams=5, max_length=12, batch_size=7,
                                                  length_penalty=cfg.eval.length_penalty)
    with pytest.raises(ValueError, match="beams"):
        LLMSettings.coerce({"beams": 3})
