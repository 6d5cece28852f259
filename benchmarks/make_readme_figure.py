"""The README's picture of the report: two of a report's own figures, stacked and shrunk.

    python train.py --preset minimal
    python evaluate.py --run runs/minimal-shapes-inception_v3-transformer --no-meteor --no-resources --no-embeddings --no-retrieval
    python benchmarks/make_readme_figure.py --report reports/minimal-shapes-inception_v3-transformer

Top: the attention map of one test image (`figures/<run>-attention-<k>.png`); below it the first rows
of the examples figure (`figures/<run>-examples.png`: references, greedy and beam captions). The
result is quantised to a small palette so the PNG stays far below 200 KB.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

WIDTH = 800
EXAMPLE_ROW_PX = 234  # height of one example row in the examples figure (6 rows, 1,404 px)


def make_figure(report: Path, attention_index: int, example_rows: int) -> Image.Image:
    figures = report / "figures"
    attention = Image.open(next(figures.glob(f"*-attention-{attention_index}.png"))).convert("RGB")
    examples = Image.open(next(figures.glob("*-examples.png"))).convert("RGB")
    examples = examples.crop((0, 0, examples.width, min(examples.height, example_rows * EXAMPLE_ROW_PX )))
    width = max(attention.width, examples.width)
    canvas = Image.new("RGB", (width, attention.height + examples.height), "white")
    canvas.paste(attention, (0, 0))
    canvas.paste(examples, (0, attention.height))
    scale = WIDTH / width
    canvas = canvas.resize((WIDTH, round(canvas.height * scale)), Image.LANCZOS)
    return canvas.quantize(colors=256, method=Image.Quantize.MAXCOVERAGE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, type=Path, help="a report folder written by evaluate.py")
    parser.add_argument("--attention-index", type=int, default=1, help="which attention figure (0-2)")
    parser.add_argument("--example-rows", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("docs/img/report.png"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    make_figure(args.report, args.attention_index, args.example_rows).save(args.out, optimize=True)
    print(f"{args.out}: {args.out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
