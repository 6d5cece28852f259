"""Caption your own images with a trained run: `Captioner.from_run("runs/x").caption(["a.jpg"])`.

A file goes through exactly what the run's training images went through
(`features.encoder.ImageEncoder`: the run's backbone, a random one rebuilt
from its recorded seed, the same reading, resizing and preprocessing, the
same per-channel standardisation and float16 rounding), then through the
run's decoder with greedy and beam search. A test image passed as a file
therefore gets the caption its feature-cache record gets.

Images of any size and mode (grayscale, RGBA, palette, 16-bit) are accepted;
unreadable files get an `error` instead of a caption, so one bad file never
loses the others' captions.

Example:

```python
captioner = Captioner.from_run("runs/minimal-shapes-inception_v3-transformer")
result = captioner.caption(["a.jpg", "b.png"])[0]
result.greedy, result.beam
result.greedy_attention.shape   # one row per greedy word, one column per grid cell
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from caption_tf.data.images import BadImageError, load_rgb
from caption_tf.features.cache import MANIFEST, NORMALIZER_FILE
from caption_tf.features.encoder import EncoderSpec, FeatureNormalizer, ImageEncoder
from caption_tf.run_folder import FEATURE_NORMALIZER_FILE, Run, RunFolderError, load_run

DECODE_BATCH_SIZE = 32


def run_encoder(run: Run) -> ImageEncoder:
    """The image encoder a run's decoder was trained with.

    From run.json's `encoder` and the run's `feature_normalizer.npz`; runs
    trained before those were recorded fall back to their feature cache's
    manifest and statistics.

    Raises:
        FileNotFoundError / RunFolderError: naming what is missing and what to do.
    """
    spec, normalizer_path = run.info.get("encoder"), run.directory / FEATURE_NORMALIZER_FILE
    if spec is None or not normalizer_path.is_file():
        cache_dir = Path(run.info.get("feature_cache", ""))
        manifest_path, normalizer_path = cache_dir / MANIFEST, cache_dir / NORMALIZER_FILE
        if not manifest_path.is_file() or not normalizer_path.is_file():
            raise FileNotFoundError(
                f"{run.directory}: no {FEATURE_NORMALIZER_FILE} and no feature cache at {cache_dir}: the statistics its "
                "decoder's inputs were standardised with are gone; rerun train.py with the run's config.yaml to rebuild them"
            )
        manifest = json.loads(manifest_path.read_text())
        spec = manifest.get("encoder")
        if spec is None:
            features = run.config.features
            if features.weights == "none":
                raise RunFolderError(
                    f"{run.directory} was trained before random backbones were seeded: its random {features.backbone} "
                    "cannot be rebuilt, so new images would not be encoded like its training images. Retrain it "
                    "(python train.py --preset <its config.yaml> --resume never)"
                )
            spec = EncoderSpec.from_config(features).to_dict()
    return ImageEncoder(EncoderSpec.from_dict(spec), FeatureNormalizer.load(normalizer_path))


@dataclass
class ImageCaption:
    """The captions of one image, with the attention behind every word.

    `greedy_attention` / `beam_attention` are float32 [words, cells]: row t is
    where the decoder looked when it wrote word t (cells of the square feature
    grid, row-major from the top-left). `image` is the RGB array the backbone
    saw (input size x input size), for overlays. An unreadable file has only
    `path` and `error`.
    """

    path: str
    greedy: str = ""
    beam: str = ""
    greedy_words: list = field(default_factory=list)
    beam_words: list = field(default_factory=list)
    greedy_attention: Optional[np.ndarray] = None
    beam_attention: Optional[np.ndarray] = None
    beam_score: Optional[float] = None
    image: Optional[np.ndarray] = None
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Captioner:
    """A trained run as a captioner of image files (or of already encoded grids).

    Args:
        run: a `Run` loaded with its model (`run_folder.load_run`).
        encoder: the run's image encoder (default: `run_encoder(run)`).
        beam_size, length_penalty: beam search settings (default: the run's
            `eval.beam_size` / `eval.length_penalty`).
        no_repeat_ngram: greedy and beam search never repeat a word n-gram of this
            length; 0: off (default: the run's `eval.no_repeat_ngram`).
        block_repeated_mentions: greedy and beam search never repeat a mention (default:
            the run's `eval.block_repeated_mentions`).
        batch_size: images per backbone and decoder call.

    Example:

    ```python
    captioner = Captioner.from_run("runs/x", beam_size=5)
    [c.beam for c in captioner.caption(["dog.jpg", "cat.png"])]
    ```
    """

    def __init__(self, run: Run, encoder: Optional[ImageEncoder] = None, beam_size: Optional[int] = None,
                 length_penalty: Optional[float] = None, batch_size: int = DECODE_BATCH_SIZE,
                 no_repeat_ngram: Optional[int] = None, block_repeated_mentions: Optional[bool] = None):
        if run.model is None:
            raise ValueError("Captioner needs a run loaded with its model: load_run(run_dir, with_model=True)")
        self.run, self._encoder = run, encoder
        self.beam_size = int(beam_size or run.config.eval.beam_size)
        self.length_penalty = run.config.eval.length_penalty if length_penalty is None else float(length_penalty)
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        self.batch_size = batch_size
        self.generator = run.generator(no_repeat_ngram=no_repeat_ngram, block_repeated_mentions=block_repeated_mentions)
        self.no_repeat_ngram = self.generator.no_repeat_ngram
        self.block_repeated_mentions = self.generator.block_repeated_mentions

    @property
    def encoder(self) -> ImageEncoder:
        """The run's image encoder, built on first use (decoding cached grids needs none)."""
        if self._encoder is None:
            self._encoder = run_encoder(self.run)
        return self._encoder

    @classmethod
    def from_run(cls, run_dir: str | Path | Run, **kwargs) -> "Captioner":
        """A captioner for the run folder `run_dir` (its config, vocabulary, decoder and encoder)."""
        return cls(run_dir if isinstance(run_dir, Run) else load_run(run_dir), **kwargs)

    def caption(self, paths: Sequence[str | Path]) -> list[ImageCaption]:
        """Greedy and beam captions of image files, in the order given."""
        paths = [str(p) for p in paths]
        results = [ImageCaption(path=p) for p in paths]
        for index, images, raw, ok in self.encoder.raw_batches(paths, self.batch_size):
            good = np.flatnonzero(ok)
            for j in np.flatnonzero(~ok):
                results[int(index[j])].error = _read_error(paths[int(index[j])])
            if not len(good):
                continue
            for j, decoded in zip(good, self.caption_grids(self.encoder.standardise(raw[good]))):
                item = results[int(index[j])]
                for key, value in decoded.items():
                    setattr(item, key, value)
                item.image = images[j]
        return results

    def caption_grids(self, grids: np.ndarray) -> list[dict]:
        """Decode standardised grids [N, cells, C] (e.g. from the feature cache), in batches.

        Returns one dict per grid: greedy, beam (text), greedy_words, beam_words,
        greedy_attention, beam_attention ([words, cells]) and beam_score.
        """
        out = []
        for start in range(0, len(grids), self.batch_size):
            grid = grids[start : start + self.batch_size]
            count = len(grid)
            if count < self.batch_size:
                # Every call the same shape: one trace of each decoding loop (seconds each) serves all
                # batches; decoding the padding rows costs milliseconds.
                grid = np.concatenate([grid, np.zeros((self.batch_size - count, *grid.shape[1:]), grid.dtype)])
            greedy_tokens, greedy_att = self.generator.greedy(grid)
            beam_tokens, beam_scores, beam_att = self.generator.beam(grid, self.beam_size, self.length_penalty)
            rows = zip(greedy_tokens.numpy(), greedy_att.numpy(), beam_tokens.numpy(), beam_scores.numpy(), beam_att.numpy())
            for g_tok, g_att, b_tok, b_score, b_att in list(rows)[:count]:
                g_words, b_words = self.run.vocab.step_words(g_tok), self.run.vocab.step_words(b_tok)
                out.append({
                    "greedy": " ".join(g_words), "beam": " ".join(b_words),
                    "greedy_words": g_words, "beam_words": b_words,
                    "greedy_attention": g_att[: len(g_words)], "beam_attention": b_att[: len(b_words)],
                    "beam_score": float(b_score),
                })
        return out


def _read_error(path: str) -> str:
    """Why an image the encoder could not decode is unreadable (the reader's own message)."""
    try:
        load_rgb(path)
    except BadImageError as exc:
        return str(exc)
    return f"{path}: could not be decoded"
