"""One place for configuration: typed dataclasses, YAML presets, CLI overrides.

A run is fully described by a `Config`. Presets in `configs/*.yaml` set some
fields; every command-line flag overrides exactly one field. Flag names are
the field names with dashes (`--checkpoint-every` sets
`checkpoint.checkpoint_every`), so field names are unique across sections.

Example:

>>> cfg = load_config("minimal", overrides={"decoder": "gru"})
>>> cfg.model.decoder
'gru'
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from caption_tf.files import write_text

# The presets: configs/ beside the package in a checkout (or an editable install), caption_tf/configs in a wheel.
_PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = _PACKAGE_DIR / "configs" if (_PACKAGE_DIR / "configs").is_dir() else _PACKAGE_DIR.parent / "configs"


@dataclass
class DataConfig:
    """Which dataset, where it lives, how it is split."""

    dataset: str = "shapes"  # shapes | flickr8k | flickr30k | coco | karpathy | custom
    data_dir: Optional[str] = None  # dataset files; shapes: where it is generated
    data_root: str = "data"  # default home of generated/downloaded datasets
    split_file: Optional[str] = None  # Karpathy dataset_*.json, used when given
    captions_file: Optional[str] = None  # custom datasets: CSV/JSONL of image,caption
    download: bool = False
    num_images: int = 600  # shapes: scenes generated
    scene_size: int = 128  # shapes: pixel size of a generated scene
    max_objects: int = 3  # shapes: objects per scene (1..max_objects)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    max_train_images: Optional[int] = None  # cap for smoke runs on real data
    data_seed: int = 1234


@dataclass
class TextConfig:
    """Caption vocabulary and length."""

    vocab_size: Optional[int] = 3000  # auto/None: words seen >= k times (training.autoconfig)
    max_length: Optional[int] = 15  # tokens incl. <start>/<end>; auto/None: 95th percentile
    min_word_count: int = 1


@dataclass
class FeatureConfig:
    """Backbone and feature cache."""

    backbone: str = "inception_v3"
    weights: str = "imagenet"  # imagenet | none | PATH to .weights.h5
    input_size: Optional[int] = None  # None: the backbone's native size
    cache_dir: str = "cache/features"
    extract_batch_size: int = 32
    # The backbone's compute precision while extracting. auto: bfloat16 on a CPU with native
    # bf16 matmuls (AMX or AVX512-BF16) and no GPU, else float32 (docs/performance.md).
    extract_precision: str = "float32"  # float32 | bfloat16 | auto
    shard_size: int = 512  # images per TFRecord shard
    fine_tune_layers: int = 0  # phase 2: unfreeze the last N backbone layers


@dataclass
class ModelConfig:
    """Decoder architecture and training objective (see docs/models.md)."""

    decoder: str = "lstm"  # lstm | gru | transformer
    attention: str = "bahdanau"  # bahdanau | luong (LSTM/GRU; the transformer cross-attends)
    luong_score: str = "general"  # dot | general
    embedding_dim: int = 64  # word embeddings; the transformer's model width
    units: int = 128  # LSTM/GRU cell width; the transformer's feed-forward width
    attention_units: Optional[int] = None  # Bahdanau hidden width; None: same as units
    feature_units: Optional[int] = None  # LSTM/GRU: projected grid width; None: embedding_dim (luong_score dot: units)
    num_layers: int = 2  # transformer decoder layers
    num_heads: int = 4  # attention heads of the transformer decoder and of the grid encoder layers
    grid_positions: str = "learned"  # learned | sinusoidal | none: 2-D position of each grid cell
    grid_adapter: str = "none"  # none | conv: a trainable residual 3x3 convolution over the frozen grid
    encoder_layers: int = 0  # Transformer encoder layers (self-attention + feed-forward) over the grid cells
    registers: int = 0  # transformer: learned memory slots its cross-attention may look at instead of the image
    encoder_registers: bool = False  # transformer: the registers pass through the grid encoder layers (image-dependent)
    readout_attention: bool = False  # transformer: a one-head attention the output layer reads; the maps come from it
    tie_embeddings: bool = False  # predict words through the input embedding matrix
    deep_output: bool = False  # Bahdanau: predict through Dense(units, tanh) over [cell output; context]
    dropout: float = 0.0  # on the features the output layer reads
    attention_penalty: float = 0.0  # weight of the doubly stochastic attention penalty (0: off)
    label_smoothing: float = 0.0  # of the cross-entropy targets (0: off)
    scheduled_sampling: float = 0.0  # Bahdanau: chance of feeding a caption its own previous word in training, reached halfway (0: off)

    @property
    def family(self) -> tuple[str, ...]:
        """The settings that say which decoder this is; `attention` does not apply to the transformer.

        Example:

        >>> ModelConfig().family, ModelConfig(decoder="transformer").family
        (('lstm', 'bahdanau'), ('transformer',))
        """
        return (self.decoder,) if self.decoder == "transformer" else (self.decoder, self.attention)

    @property
    def grid_width(self) -> int:
        """The width of the projected grid cells the decoder attends over.

        `feature_units` if set. By default the word embedding width, as the classic captioning
        tutorial's encoder (`Dense(embedding_dim)` over the grid) and the transformer's memory;
        Luong's "dot" score compares the cells with the cell output, so it needs `units`.

        Example:

        >>> ModelConfig(embedding_dim=64, units=128).grid_width, ModelConfig(attention="luong", luong_score="dot").grid_width
        (64, 128)
        """
        if self.decoder == "transformer":
            return self.embedding_dim
        if self.feature_units:
            return self.feature_units
        return self.units if self.attention == "luong" and self.luong_score == "dot" else self.embedding_dim

    @property
    def label(self) -> str:
        """What the decoder is, for logs and reports.

        Example:

        >>> ModelConfig().label, ModelConfig(decoder="transformer").label
        ('lstm + bahdanau', 'transformer')
        """
        return " + ".join(self.family)


@dataclass
class TrainConfig:
    """Optimisation and runtime."""

    epochs: int = 5
    batch_size: Optional[int] = 64  # captions per replica and step; auto/None: from the number of training pairs
    group_by_image: bool = False  # a step takes whole images with all their captions (batch_size / captions-per-image images): each grid encoded once, steps up to 2x faster, but fewer images per step: minimal's val BLEU-4 0.60 vs 0.64 (docs/performance.md)
    learning_rate: Optional[float] = 1e-3  # auto/None: from the batch size
    lr_schedule: str = "constant"  # constant | warmup_cosine | plateau
    warmup_epochs: float = 1.0
    clipnorm: Optional[float] = 5.0
    early_stopping_patience: int = 0  # 0: no early stopping
    early_stopping_monitor: str = "val_loss"
    shuffle_buffer: int = 4096
    seed: int = 42
    precision: str = "auto"  # auto | float32 | mixed_float16 | mixed_bfloat16
    jit: str = "auto"  # auto | on | off
    recompute_grad: bool = False
    distribute: str = "auto"  # auto | default | mirrored | multiworker
    cpu_replicas: int = 1  # split the CPU into N logical devices (MirroredStrategy without GPUs)
    cluster_start_timeout: int = 600  # seconds a multi-worker job waits for all its workers to start
    runs_dir: str = "runs"
    run_name: Optional[str] = None
    tune: bool = False
    trials: int = 10
    fine_tune_epochs: int = 2  # phase 2 (--fine-tune-layers > 0): end-to-end epochs on images
    fine_tune_learning_rate: float = 1e-5
    fine_tune_batch_size: int = 16  # images per step (each with all its captions)
    profile_batches: Optional[str] = None  # "A,B": profile batches A..B of the process (TensorBoard's Profile tab)
    tensorboard_images: int = 3  # validation images drawn under their attention maps in TensorBoard each epoch (~0.1 s CPU each)
    verbose: bool = False  # show TensorFlow's C++ start-up messages (CUDA probing, oneDNN, CPU features)


@dataclass
class CheckpointConfig:
    """Crash recovery."""

    checkpoint_every: int = 50  # batches between checkpoints (0: epoch ends only)
    keep_checkpoints: int = 3
    resume: str = "auto"  # auto | never
    async_checkpoint: bool = True
    max_restarts: int = 0


@dataclass
class EvalConfig:
    """Decoding and evaluation."""

    beam_size: int = 3
    length_penalty: float = 0.7
    # Chosen on validation (docs/models.md): banning repeated mentions stops "a red circle above a red
    # circle" as a 3-gram ban did, and keeps "a small red circle above a small red square".
    no_repeat_ngram: int = 0  # > 0: greedy and beam search never repeat an n-gram of this length; 0: off
    block_repeated_mentions: bool = True  # greedy and beam search never repeat a mention (the words after "a"/"the" up to the next function word)
    eval_batch_size: int = 64
    max_eval_images: Optional[int] = None
    meteor: bool = True  # METEOR needs Java; ~8 s JVM start
    word_vectors: Optional[str] = None  # GloVe/word2vec/.kv file for semantic similarity; None: train word2vec on training captions


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    preset: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config) if f.name != "preset"}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def field_index() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Map every field name to (section, Field, resolved type); names are unique."""
    index: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise RuntimeError(f"Config field name {f.name!r} is not unique")
            index[f.name] = (section, f, hints[f.name])
    return index


def _base_type(tp: Any) -> Any:
    """Optional[int] -> int."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or CLI value to the field's type, with a clear error."""
    optional = type(None) in typing.get_args(tp)
    base = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "", "auto")):
        if optional:
            return None
        raise ValueError(f"Config field {name!r} cannot be empty")
    try:
        if base is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if base is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"Config field {name!r} expects {base.__name__}, got {value!r}") from None


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    path = CONFIG_DIR / f"{preset}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"Unknown preset {preset!r}: no file {path}. Known presets: {known}")
    return path


def config_from_dict(raw: dict) -> Config:
    """Build a Config from a nested dict (a preset or a saved run config)."""
    cfg = Config()
    index = field_index()
    for section, values in (raw or {}).items():
        if section == "preset":
            cfg.preset = values
            continue
        if section not in SECTIONS:
            raise ValueError(f"Unknown config section {section!r}; expected one of {sorted(SECTIONS)}")
        for name, value in (values or {}).items():
            if name not in index or index[name][0] != section:
                raise ValueError(f"Unknown config field {section}.{name}")
            setattr(getattr(cfg, section), name, coerce(name, value, index[name][2]))
    return cfg


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Set fields by their (unique) name: {"decoder": "gru", "epochs": 2}."""
    index = field_index()
    for name, value in overrides.items():
        if name not in index:
            raise ValueError(f"Unknown config field {name!r}")
        section, _, tp = index[name]
        setattr(getattr(cfg, section), name, coerce(name, value, tp))
    validate(cfg)
    return cfg


def load_config(preset: Optional[str] = "minimal", overrides: Optional[dict] = None) -> Config:
    if preset:
        with open(preset_path(preset)) as fh:
            cfg = config_from_dict(yaml.safe_load(fh))
        cfg.preset = Path(preset).stem
    else:
        cfg = Config()
    return apply_overrides(cfg, overrides or {})


CHOICES = {
    "decoder": ("lstm", "gru", "transformer"),
    "grid_positions": ("learned", "sinusoidal", "none"),
    "grid_adapter": ("none", "conv"),
    "attention": ("bahdanau", "luong"),
    "luong_score": ("dot", "general"),
    "precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "extract_precision": ("float32", "bfloat16", "auto"),
    "jit": ("auto", "on", "off"),
    "resume": ("auto", "never"),
    "lr_schedule": ("constant", "warmup_cosine", "plateau"),
    "early_stopping_monitor": ("val_loss", "val_bleu4"),
    "distribute": ("auto", "default", "mirrored", "multiworker"),
}


def validate(cfg: Config) -> None:
    index = field_index()
    for name, choices in CHOICES.items():
        section = index[name][0]
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {choices}, got {value!r}")
    if cfg.text.vocab_size is not None and cfg.text.vocab_size < 5:
        raise ValueError(f"--vocab-size must be at least 5 (4 reserved tokens and one word) or auto, got {cfg.text.vocab_size}")
    if cfg.text.max_length is not None and cfg.text.max_length < 3:
        raise ValueError("--max-length must be at least 3 (<start>, a word, <end>)")
    if cfg.train.cpu_replicas < 1:
        raise ValueError(f"--cpu-replicas must be >= 1, got {cfg.train.cpu_replicas}")
    if (cfg.train.batch_size is not None and cfg.train.batch_size < 1) or cfg.train.epochs < 0:
        raise ValueError("--batch-size must be >= 1 and --epochs >= 0")
    profile_batch_range(cfg.train.profile_batches)
    if cfg.train.tensorboard_images < 0:
        raise ValueError(f"--tensorboard-images must be >= 0 (0: no attention images), got {cfg.train.tensorboard_images}")
    model = cfg.model
    if model.encoder_layers < 0:
        raise ValueError(f"--encoder-layers must be >= 0 (0: none), got {model.encoder_layers}")
    if model.registers < 0:
        raise ValueError(f"--registers must be >= 0 (0: none), got {model.registers}")
    transformer_only = {"registers": model.registers, "encoder_registers": model.encoder_registers,
                        "readout_attention": model.readout_attention}
    if model.decoder != "transformer" and any(transformer_only.values()):
        given = ", ".join(f"{name}={value}" for name, value in transformer_only.items() if value)
        raise ValueError(
            f"--registers, --encoder-registers and --readout-attention are settings of --decoder transformer, got {given}"
            f" with --decoder {model.decoder}: drop them (--registers 0) or add --decoder transformer"
        )
    if model.encoder_registers and not (model.registers and model.encoder_layers):
        raise ValueError(
            f"--encoder-registers encodes the registers with the cells: it needs --registers N and --encoder-layers N, "
            f"got {model.registers} registers and {model.encoder_layers} encoder layers"
        )
    if model.scheduled_sampling and (model.decoder == "transformer" or model.attention != "bahdanau" or cfg.train.recompute_grad
                                     or not 0 < model.scheduled_sampling <= 1):
        raise ValueError(
            f"--scheduled-sampling must be in (0, 1] with an LSTM/GRU decoder, --attention bahdanau and without --recompute-grad"
            f" (the other decoders read the whole caption at once), got {model.scheduled_sampling} with {model.label},"
            f" recompute_grad={cfg.train.recompute_grad}"
        )
    # The heads split a width: checked here, not after minutes of feature extraction.
    if model.decoder == "transformer" and model.embedding_dim % model.num_heads:
        raise ValueError(f"--decoder transformer needs --embedding-dim ({model.embedding_dim}) divisible by --num-heads, got {model.num_heads} heads")
    if model.encoder_layers and model.grid_width % model.num_heads:
        raise ValueError(f"--encoder-layers needs the grid cells' width ({model.grid_width}) divisible by --num-heads, got {model.num_heads} heads")


def profile_batch_range(value: Optional[str]) -> tuple[int, int] | int:
    """`--profile-batches` as Keras' TensorBoard `profile_batch`: (A, B), or 0 (off) for none.

    Example:

    >>> profile_batch_range("10,20"), profile_batch_range("5"), profile_batch_range(None)
    ((10, 20), (5, 5), 0)
    """
    if value is None or str(value).strip() in ("", "0"):
        return 0
    parts = str(value).split(",")
    try:
        first, last = (int(p) for p in (parts * 2 if len(parts) == 1 else parts))
    except ValueError:
        first = last = -1
    if len(parts) > 2 or not 1 <= first <= last:
        raise ValueError(f"--profile-batches expects A,B with 1 <= A <= B (batches of this training process), or 0 for none; got {value!r}")
    return first, last


def save_config(cfg: Config, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_saved_config(path: str | Path) -> Config:
    with open(path) as fh:
        return config_from_dict(yaml.safe_load(fh))


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are None so only given flags override."""
    for name, (section, f, tp) in field_index().items():
        flag = "--" + name.replace("_", "-")
        base = _base_type(tp)
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": f"override {section}.{name}"}
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if name in CHOICES:
            kwargs["choices"] = CHOICES[name]
        parser.add_argument(flag, type=str, **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in field_index() if getattr(args, name, None) is not None}
