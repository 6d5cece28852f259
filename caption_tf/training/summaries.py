"""What a run shows in TensorBoard, on one step axis across resumes and the two phases.

    runs/<name>/logs/
        train/          Keras' epoch_* scalars (loss, learning_rate, epoch_seconds, ...), the model graph,
                        profiles (--profile-batches A,B: the Profile tab)
        validation/     epoch_loss, epoch_bleu4 (val BLEU-4); epoch_captions (text): the greedy caption of
                        fixed validation images beside their references; epoch_attention/<image id>
                        (images): the attention grid of the first of them
        test/           epoch_bleu1..4: test-split BLEU after training, at the last epoch
        .               health/* scalars and health/alerts (text); the HParams record of the run

Two x axes, as Keras has them: tags named `epoch_*` are logged at the epoch,
every other tag at the global batch step. Phase 2 (fine-tuning) continues the
phase-1 curves in the same folders (`SummaryAxis` offsets), and a resumed
process continues the curves of the one before it: `trim_events` first drops
what the crashed process logged past the checkpoint training resumes from
(it trains those batches again), and nothing is logged again at the step it
resumes at, so no step is logged twice.

Example:

```python
axis = SummaryAxis()
callbacks = [TensorBoard("runs/x/logs", axis), SampleCaptions("runs/x/logs/validation", samples, vocab, axis)]
```
"""

from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2

from caption_tf.config import CHOICES, Config

TRAIN_DIR, VALIDATION_DIR, TEST_DIR = "train", "validation", "test"  # Keras' names for the first two
EPOCH_TAG_PREFIX = "epoch_"  # Keras' per-epoch tags; every other tag is on the batch-step axis
CAPTIONS_TAG, ATTENTION_TAG = "epoch_captions", "epoch_attention"
LOSS_TAG, BLEU_TAG = "epoch_loss", "epoch_bleu{n}"
SAMPLE_IMAGES = 6  # validation images captioned in the text dashboard each epoch
ATTENTION_IMAGES = 3  # of those, drawn under their attention maps (--tensorboard-images; ~0.1 s each per epoch)
EVENT_FILE_GLOB = "events.out.tfevents.*"


# ------------------------------------------------------------------ the step axis


@dataclasses.dataclass
class SummaryAxis:
    """Where this process's summaries go on the x axes: after what earlier phases logged.

    `step` returns the batches trained in this phase (the checkpointed position); the
    crash-recovery stack binds it (`recovery.ResumableTraining`).
    """

    epoch_offset: int = 0
    step_offset: int = 0
    step: Callable[[], int] = lambda: 0

    def global_step(self) -> int:
        return self.step_offset + int(self.step())


class TensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` on the run's step axis.

    Keras logs epoch `e` of the current `fit` at step `e`, validation "vs iterations" at the
    optimizer's iteration count, the model graph in every `fit` call, and counts profiled
    batches from each `fit` call's start. A run is several `fit` calls (the rest of an
    interrupted epoch, phase 2, resumed processes), so this subclass: adds the axis offsets,
    writes the graph once per run, counts `profile_batch` over the whole process, and flushes
    each epoch's summaries at once (a run watched live shows them; a kill loses none).

    Args:
        log_dir: the run's `logs/`; axis: a `SummaryAxis`.
        profile_batch: as Keras' ("A,B", (A, B) or 0): batches A..B of this process are profiled.
    """

    def __init__(self, log_dir, axis: Optional[SummaryAxis] = None, profile_batch=0):
        super().__init__(str(log_dir), update_freq="epoch", profile_batch=profile_batch)
        self.axis = axis or SummaryAxis()
        self._batches_before = 0

    def set_model(self, model):
        # The graph at step 0, once: not again for a resumed process or phase 2.
        self.write_graph = self.write_graph and self.axis.global_step() == 0
        super().set_model(model)
        self.write_graph = False

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._global_train_batch = self._batches_before  # Keras restarts the count in every fit

    def on_train_end(self, logs=None):
        self._batches_before = self._global_train_batch
        super().on_train_end(logs)

    def on_test_end(self, logs=None):
        with self._val_writer.as_default():
            for name, value in (logs or {}).items():
                self.summary.scalar(f"evaluation_{name}_vs_iterations", value, step=self.axis.global_step())
        self._pop_writer()

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch + self.axis.epoch_offset, logs)
        for writer in self._writers.values():
            writer.flush()


# ------------------------------------------------------------------ sample captions and attention


@dataclasses.dataclass
class SampleSet:
    """The fixed images captioned each epoch: their ids, references, feature grids and pictures.

    `grids` [N, cells, dim] are the cached features (phase 1); phase 2 encodes the images itself.
    `images` are the first few pictures (uint8, `--tensorboard-images`), drawn under their attention maps.
    """

    image_ids: list[str]
    references: list[list[str]]
    grids: Optional[np.ndarray]
    images: list[np.ndarray]


def markdown_table(image_ids: Sequence[str], captions: Sequence[str], references: Sequence[Sequence[str]], epoch: int) -> str:
    """One row per image: its id, the greedy caption, its references (a Markdown table for the text dashboard).

    Example:

    >>> print(markdown_table(["img1"], ["a red circle"], [["a red circle", "a small red circle"]], 0))
    | image | greedy caption, epoch 1 | references |
    |---|---|---|
    | img1 | a red circle | a red circle<br>a small red circle |
    """

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"| image | greedy caption, epoch {epoch + 1} | references |", "|---|---|---|"]
    for image_id, caption, refs in zip(image_ids, captions, references):
        lines.append(f"| {cell(image_id)} | {cell(caption) or '(empty)'} | {'<br>'.join(cell(r) for r in refs)} |")
    return "\n".join(lines)


class SampleCaptions(keras.callbacks.Callback):
    """Each epoch end: greedy captions of fixed validation images (text) and attention grids (images).

    The same images every epoch, so a user sees the captions improve. The attention grid is
    the evaluation report's figure (`caption_tf.figures.attention_grid_png`).

    Args:
        log_dir: the run's `logs/validation`.
        samples: a `SampleSet`; vocab: the run's `CaptionVocabulary`; axis: a `SummaryAxis`.
        encode: model -> feature grids of the samples (default: `samples.grids`, the cached features).
        make_generator: model -> the `CaptionGenerator` to decode with: training's, shared with the
            validation BLEU callback (one trace), or one for a fine-tuned model's decoder.

    Example:

    ```python
    samples = SampleCaptions("runs/x/logs/validation", sample_set(data), vocab, SummaryAxis(), make_generator=make_generator)
    model.fit(ds, callbacks=[samples])
    ```
    """

    def __init__(self, log_dir, samples: SampleSet, vocab, axis: Optional[SummaryAxis] = None,
                 encode: Optional[Callable] = None, *, make_generator: Callable):
        super().__init__()
        self.log_dir, self.samples, self.vocab, self.axis = str(log_dir), samples, vocab, axis or SummaryAxis()
        self.encode = encode or (lambda model: samples.grids)
        self.make_generator = make_generator
        self.last_captions: list[str] = []
        self._generator = None
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        from caption_tf.figures import attention_grid_png

        if self._generator is None:
            self._generator = self.make_generator(self.model)
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        tokens, attention = (t.numpy() for t in self._generator.greedy(np.asarray(self.encode(self.model))))
        words = [self.vocab.step_words(row) for row in tokens]
        self.last_captions = [" ".join(w) for w in words]
        step = epoch + self.axis.epoch_offset
        with self._writer.as_default(step=step):
            tf.summary.text(CAPTIONS_TAG, markdown_table(self.samples.image_ids, self.last_captions, self.samples.references, step))
            for k, image in enumerate(self.samples.images):
                # No title: the tag names the image, the slider the epoch, the panels the words.
                png = attention_grid_png(image, words[k], attention[k][: len(words[k])])
                png_summary(f"{ATTENTION_TAG}/{self.samples.image_ids[k]}", png)
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def png_summary(tag: str, png: bytes) -> None:
    """An image summary of PNG bytes, as `tf.summary.image` writes one. That function takes pixels
    and encodes them itself at zlib's default level: 5x slower than the PNG we have."""
    from PIL import Image
    from tensorboard.plugins.image import metadata as image_metadata

    width, height = Image.open(io.BytesIO(png)).size  # read from the PNG header
    tensor = tf.constant([str(width).encode(), str(height).encode(), png])  # the image plugin's format
    tf.summary.write(tag, tensor, metadata=image_metadata.create_summary_metadata(display_name=None, description=None))


def sample_set(image_ids: Sequence[str], references: Sequence[Sequence[str]], grids: Optional[np.ndarray],
               load_image: Callable[[str], np.ndarray], attention_images: int = ATTENTION_IMAGES) -> SampleSet:
    """The first `SAMPLE_IMAGES` of a split (cache order: the same every epoch and every run); the first
    `attention_images` of them are loaded to be drawn under their attention maps."""
    ids = list(image_ids[:SAMPLE_IMAGES])
    return SampleSet(ids, [list(r) for r in references[: len(ids)]], None if grids is None else grids[: len(ids)],
                     [load_image(i) for i in ids[:attention_images]])


# ------------------------------------------------------------------ the HParams record


def run_hparams(cfg: Config, vocab_size: int, replicas: int, precision: str) -> dict:
    """The settings the HParams dashboard compares runs by (resolved values, no `auto`).

    Example:

    ```python
    run_hparams(load_config("minimal"), 27, 1, "float32")["decoder"]
    # 'lstm'
    ```
    """
    values = {
        "preset": cfg.preset or "custom",
        "dataset": cfg.data.dataset,
        "backbone": cfg.features.backbone,
        "weights": cfg.features.weights,
        "decoder": cfg.model.decoder,
        "attention": cfg.model.attention,
        "embedding_dim": cfg.model.embedding_dim,
        "units": cfg.model.units,
        "dropout": cfg.model.dropout,
        "vocab_size": vocab_size,
        "max_length": cfg.text.max_length,
        "batch_size": cfg.train.batch_size,
        "learning_rate": cfg.train.learning_rate,
        "lr_schedule": cfg.train.lr_schedule,
        "precision": precision,
        "replicas": replicas,
        "fine_tune_layers": cfg.features.fine_tune_layers,
    }
    return {k: "none" if v is None else v for k, v in values.items()}


def _hparams_config():
    from tensorboard.plugins.hparams import api as hp

    domains = {"decoder": CHOICES["decoder"], "attention": CHOICES["attention"], "lr_schedule": CHOICES["lr_schedule"],
               "precision": tuple(p for p in CHOICES["precision"] if p != "auto")}
    names = list(run_hparams(Config(), 0, 1, "float32"))
    hparams = [hp.HParam(name, hp.Discrete(list(domains[name])) if name in domains else None) for name in names]
    metrics = [
        hp.Metric(LOSS_TAG, group=TRAIN_DIR, display_name="train loss"),
        hp.Metric(LOSS_TAG, group=VALIDATION_DIR, display_name="val loss"),
        hp.Metric(BLEU_TAG.format(n=4), group=VALIDATION_DIR, display_name="val BLEU-4"),
        *(hp.Metric(BLEU_TAG.format(n=n), group=TEST_DIR, display_name=f"test BLEU-{n}") for n in range(1, 5)),
    ]
    return hp, hparams, metrics


def write_hparams(log_dir: str | Path, hparams: dict, trial_id: str) -> None:
    """The HParams record of one run (or tuning trial) in `log_dir`, at step 0.

    Every run writes the same experiment definition (the hyperparameters above and the
    final metrics: train/val loss, val BLEU-4, test BLEU-1..4, read from the scalars of
    `log_dir/train|validation|test`), so the dashboard compares all runs under `--logdir`.
    """
    hp, hparams_list, metrics = _hparams_config()
    writer = tf.summary.create_file_writer(str(log_dir))
    with writer.as_default(step=0):
        hp.hparams_config(hparams=hparams_list, metrics=metrics)
        hp.hparams(hparams, trial_id=trial_id)
    writer.close()


# ------------------------------------------------------------------ reading and trimming event files


def event_files(log_dir: str | Path) -> list[Path]:
    """Event files under `log_dir` (all depths), oldest first within each folder."""
    return sorted(Path(log_dir).rglob(EVENT_FILE_GLOB)) if Path(log_dir).is_dir() else []


def _records(path: Path) -> tuple[list[bytes], bool]:
    """The complete records of an event file, and whether it ended in a truncated one (a writer killed mid-write)."""
    records = []
    try:
        for record in tf.data.TFRecordDataset(str(path)):
            records.append(record.numpy())
    except tf.errors.DataLossError:
        return records, True
    return records, False


def read_events(path: str | Path) -> Iterator[event_pb2.Event]:
    """The events of one file, a truncated last record left out."""
    for record in _records(Path(path))[0]:
        yield event_pb2.Event.FromString(record)


def scalar_steps(log_dir: str | Path, tag: str) -> list[int]:
    """Steps at which `tag` was logged in the event files directly in `log_dir`."""
    return [e.step for p in sorted(Path(log_dir).glob(EVENT_FILE_GLOB)) for e in read_events(p) for v in e.summary.value if v.tag == tag]


def _kept(tag: str, step: int, epochs: int, last_step: int) -> bool:
    return step < epochs if tag.startswith(EPOCH_TAG_PREFIX) else step <= last_step


def trim_events(log_dir: str | Path, epochs: int, last_step: int) -> int:
    """Keep what was logged up to a resume point: `epoch_*` tags of the first `epochs` epochs, others up to `last_step`.

    A resumed process trains again from the checkpoint it restored (`epochs` finished,
    `last_step` batches done): what the crashed process logged after it would be logged
    twice. -1 drops every batch-step summary (nothing was checkpointed). A truncated last
    record goes too. Files are rewritten atomically; returns the summaries dropped.
    """
    dropped = 0
    for path in event_files(log_dir):
        records, truncated = _records(path)
        kept, changed = [], truncated
        for record in records:
            event = event_pb2.Event.FromString(record)
            if event.HasField("summary"):
                values = [v for v in event.summary.value if _kept(v.tag, event.step, epochs, last_step)]
                if len(values) != len(event.summary.value):
                    changed, dropped = True, dropped + len(event.summary.value) - len(values)
                    if not values:
                        continue
                    del event.summary.value[:]
                    event.summary.value.extend(values)
                    record = event.SerializeToString()
            elif not event.HasField("file_version") and event.step > last_step:  # a graph, a session log
                changed, dropped = True, dropped + 1
                continue
            kept.append(record)
        if not changed:
            continue
        if all(event_pb2.Event.FromString(r).HasField("file_version") for r in kept):
            path.unlink()  # nothing left but the header
            continue
        partial = path.with_name(f"partial-{path.name}")
        with tf.io.TFRecordWriter(str(partial)) as writer:
            for record in kept:
                writer.write(record)
        os.replace(partial, path)
    return dropped


def last_epoch(log_dir: str | Path) -> Optional[int]:
    """The last epoch logged in `log_dir/train` (phase 2 included), or None."""
    steps = scalar_steps(Path(log_dir) / TRAIN_DIR, LOSS_TAG)
    return max(steps) if steps else None


def write_test_metrics(log_dir: str | Path, scores: dict) -> bool:
    """Test-split BLEU-1..4 in `log_dir/test` at the last trained epoch, beside the val BLEU-4 curve.

    Once per epoch count: re-evaluating a finished run writes nothing new. Returns whether it wrote.
    """
    epoch = last_epoch(log_dir)
    test_dir = Path(log_dir) / TEST_DIR
    if epoch is None or epoch in scalar_steps(test_dir, BLEU_TAG.format(n=4)):
        return False
    writer = tf.summary.create_file_writer(str(test_dir))
    with writer.as_default(step=epoch):
        for n in range(1, 5):
            tf.summary.scalar(BLEU_TAG.format(n=n), float(scores[f"bleu{n}"]))
    writer.close()
    return True

