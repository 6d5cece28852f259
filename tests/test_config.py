import pytest

from caption_tf.cli import train_parser
from caption_tf.config import (
    Config,
    apply_overrides,
    field_index,
    load_config,
    load_saved_config,
    overrides_from_args,
    save_config,
)


@pytest.mark.parametrize(
    "preset, emb, units, vocab, length, epochs",
    [("minimal", 64, 128, 3000, 15, 10), ("fast", 128, 256, 5000, 20, 30), ("optimized", 256, 384, 8000, 25, 30)],
)
def test_presets_carry_the_guide_numbers(preset, emb, units, vocab, length, epochs):
    cfg = load_config(preset)
    assert (cfg.model.embedding_dim, cfg.model.units) == (emb, units)
    assert (cfg.text.vocab_size, cfg.text.max_length, cfg.train.epochs) == (vocab, length, epochs)
    assert 32 <= cfg.train.batch_size <= 128
    assert 1e-3 <= cfg.train.learning_rate <= 2e-3
    assert cfg.preset == preset


def test_only_fast_batches_whole_images():
    # Chosen on validation (docs/performance.md): as good at 4,000 scenes, 0.04 BLEU-4 worse at 800.
    assert [load_config(p).train.group_by_image for p in ("minimal", "fast", "optimized")] == [False, True, False]


def test_optimized_uses_early_stopping():
    assert 2 <= load_config("optimized").train.early_stopping_patience <= 5


def test_every_field_is_a_cli_flag_and_overrides_its_field():
    args = train_parser().parse_args(["--preset", "minimal", "--decoder", "gru", "--epochs", "2", "--no-async-checkpoint",
                                      "--input-size", "none", "--learning-rate", "0.01"])
    cfg = apply_overrides(load_config("minimal"), overrides_from_args(args))
    assert cfg.model.decoder == "gru"
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    assert cfg.checkpoint.async_checkpoint is False
    assert cfg.features.input_size is None
    assert cfg.train.learning_rate == 0.01
    # Flags that were not given leave the preset alone.
    assert cfg.model.units == 128
    flags = {a.dest for a in train_parser()._actions}
    assert set(field_index()) <= flags


def test_bad_values_are_rejected_with_the_field_name():
    with pytest.raises(ValueError, match="epochs"):
        apply_overrides(Config(), {"epochs": "many"})
    with pytest.raises(ValueError, match="decoder"):
        apply_overrides(Config(), {"decoder": "mamba"})
    with pytest.raises(ValueError, match="Unknown config field"):
        apply_overrides(Config(), {"no_such_field": 1})
    with pytest.raises(FileNotFoundError, match="Known presets"):
        load_config("nonexistent")
    with pytest.raises(ValueError, match="--vocab-size must be at least 5"):  # 0 trained a model of reserved tokens only
        apply_overrides(Config(), {"vocab_size": 0})
    assert apply_overrides(Config(), {"vocab_size": "auto"}).text.vocab_size is None
    with pytest.raises(ValueError, match="settings of --decoder transformer, got registers=4 with --decoder gru"):
        load_config("fast", {"registers": 4})  # the Transformer `fast` of before had 4: silently unused by the GRU
    with pytest.raises(ValueError, match="got readout_attention=True with --decoder lstm"):
        apply_overrides(Config(), {"decoder": "lstm", "readout_attention": True})
    with pytest.raises(ValueError, match="--encoder-registers .* got 0 registers and 1 encoder layers"):
        apply_overrides(Config(), {"decoder": "transformer", "encoder_registers": True, "encoder_layers": 1})
    with pytest.raises(ValueError, match="--encoder-layers must be >= 0"):
        apply_overrides(Config(), {"encoder_layers": -1})
    with pytest.raises(ValueError, match=r"cells' width \(64\) divisible by --num-heads, got 3 heads"):
        apply_overrides(Config(), {"encoder_layers": 1, "num_heads": 3})  # LSTM cells: `embedding_dim` wide
    assert apply_overrides(Config(), {"encoder_layers": 1, "num_heads": 3, "decoder": "transformer", "embedding_dim": 48}).model.encoder_layers == 1
    with pytest.raises(ValueError, match=r"--decoder transformer needs --embedding-dim \(64\) divisible by --num-heads, got 3 heads"):
        apply_overrides(Config(), {"decoder": "transformer", "num_heads": 3})  # no encoder layer: the decoder's own heads


def test_saved_config_round_trips(tmp_path):
    cfg = load_config("fast", {"attention": "luong", "seed": 7})
    save_config(cfg, tmp_path / "config.yaml")
    assert load_saved_config(tmp_path / "config.yaml") == cfg
