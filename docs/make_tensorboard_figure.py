"""Draw docs/tensorboard.png from a run's TensorBoard event files: what the Text and Images dashboards show.

No browser on the machines the figure was made on, so the two panels are drawn with
matplotlib from the very data TensorBoard serves (read with its own event reader):
the `epoch_captions` Markdown table of the first and the last epoch, and the last
epoch's `epoch_attention/<image>` image as logged.

    python docs/make_tensorboard_figure.py runs/minimal-shapes-inception_v3-lstm-bahdanau docs/tensorboard.png
"""

from __future__ import annotations

import io
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing import event_accumulator  # noqa: E402

ROWS_SHOWN = 4
PALETTE_COLOURS = 96  # the PNG is quantised to stay small


def table_rows(markdown: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split(" | ")] for line in markdown.splitlines()[2:]]


def main(run_dir: str, out: str) -> None:
    validation = event_accumulator.EventAccumulator(str(Path(run_dir) / "logs" / "validation"), size_guidance={event_accumulator.TENSORS: 0})
    validation.Reload()
    tables = validation.Tensors("epoch_captions")
    first, last = (table_rows(tf.make_ndarray(t.tensor_proto).item().decode()) for t in (tables[0], tables[-1]))
    image_tag = sorted(t for t in validation.Tags()["tensors"] if t.startswith("epoch_attention/"))[0]
    image_event = validation.Tensors(image_tag)[-1]
    png = tf.make_ndarray(image_event.tensor_proto)[2]
    attention = Image.open(io.BytesIO(png)).convert("RGB")

    fig = plt.figure(figsize=(11, 8.4))
    text_ax = fig.add_axes([0.02, 0.63, 0.96, 0.34])
    text_ax.axis("off")
    text_ax.set_title(f"TEXT  epoch_captions  (run {Path(run_dir).name}/logs/validation), steps {tables[0].step} and {tables[-1].step}",
                      loc="left", fontsize=10, family="monospace")
    wrap = lambda s, n: "\n".join(textwrap.wrap(s, n)) or "(empty)"  # noqa: E731
    cells = [[r[0], wrap(f[1], 26), wrap(r[1], 34), wrap(r[2].split("<br>")[0], 34)] for f, r in zip(first[:ROWS_SHOWN], last[:ROWS_SHOWN])]
    table = text_ax.table(cellText=cells, colLabels=["image", f"greedy caption, epoch {tables[0].step + 1}",
                                                      f"greedy caption, epoch {tables[-1].step + 1}", "first reference"],
                          loc="upper left", cellLoc="left", colWidths=[0.16, 0.24, 0.3, 0.3])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 3.0)
    image_ax = fig.add_axes([0.02, 0.01, 0.96, 0.57])
    image_ax.imshow(attention)
    image_ax.axis("off")
    image_ax.set_title(f"IMAGES  {image_tag}  (logs/validation), step {image_event.step}", loc="left", fontsize=10, family="monospace")
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=72, format="png")
    Image.open(buffer).convert("RGB").quantize(PALETTE_COLOURS).save(out, optimize=True)
    print(f"{out}: {Path(out).stat().st_size // 1024} KB")


if __name__ == "__main__":
    main(*sys.argv[1:3])
