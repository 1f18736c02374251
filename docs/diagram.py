"""Draws docs/images/overview.png, the picture at the top of README.md.

    .venv/bin/python docs/diagram.py                 # writes docs/images/overview.png
    .venv/bin/python docs/diagram.py --output x.png  # elsewhere

(a) One dense layer becomes its factors: AMCT's spatial method turns a 3x3 Conv2d, 64 -> 64, into a
3x1 conv to r channels and a 1x3 conv back to 64 (r = 32, AMCT's rank for this layer).
(b) A job of several processes, online mode: rank 0 decomposes and saves; the others wait at the
barrier, then rebuild the structure and load the weights; then all train together.

The figures in it (weights per layer, rank) are those lowrank computes for such a layer; tests/test_docs.py
checks them against the library.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUTPUT = Path(__file__).parent / "images" / "overview.png"

# The layer of panel (a): Conv2d(64, 64, 3) and AMCT's rank for it.
CHANNELS, KERNEL, RANK = 64, 3, 32
DENSE_WEIGHTS = CHANNELS * CHANNELS * KERNEL * KERNEL  # 36,864
FACTOR_WEIGHTS = CHANNELS * RANK * KERNEL  # each factor: 6,144

INK = "#222222"
MUTED = "#555555"
DENSE = "#dbe4f0"
FACTOR = "#d9eedb"
RANK_ZERO = "#fbe3c8"
OTHERS = "#dde3f7"
FILES = "#fff4b8"
TRAIN = "#e6e6e6"
BARRIER = "#b03a2e"


def box(
    ax,
    x,
    y,
    width,
    height,
    color,
    text="",
    size=10,
    weight="normal",
    edge=INK,
    style="round,pad=0.02,rounding_size=0.8",
):
    """A rounded box with centred text, in data coordinates."""
    ax.add_patch(FancyBboxPatch((x, y), width, height, boxstyle=style, facecolor=color, edgecolor=edge, linewidth=1.1))
    if text:
        ax.text(x + width / 2, y + height / 2, text, ha="center", va="center", fontsize=size, color=INK, weight=weight)


def arrow(ax, start, end, color=INK, style="-|>", dashed=False):
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=14,
            color=color,
            linewidth=1.3,
            linestyle=(0, (4, 3)) if dashed else "solid",
            shrinkA=0,
            shrinkB=0,
        )
    )


def kernel_grid(ax, x, y, rows, cols, cell, color):
    """A kh x kw kernel drawn as cells, its lower left corner at (x, y)."""
    for row in range(rows):
        for col in range(cols):
            ax.add_patch(
                Rectangle((x + col * cell, y + row * cell), cell, cell, facecolor=color, edgecolor=INK, linewidth=1)
            )


def panel_layer(ax):
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 34)
    ax.text(0, 32.5, "(a) One dense layer becomes two smaller ones", fontsize=12.5, weight="bold", va="top")

    # The dense layer.
    box(ax, 1, 4, 27, 22, DENSE)
    ax.text(14.5, 23.5, "dense layer", ha="center", va="center", fontsize=10.5, weight="bold")
    kernel_grid(ax, 10.3, 11.5, 3, 3, 2.8, "#9fb6d6")
    ax.text(14.5, 9.2, f"Conv2d {KERNEL}×{KERNEL}, {CHANNELS} → {CHANNELS}", ha="center", fontsize=10)
    ax.text(14.5, 6.2, f"{DENSE_WEIGHTS:,} weights", ha="center", fontsize=10, color=MUTED)

    arrow(ax, (29.5, 15), (40.5, 15))
    ax.text(35, 19.5, "one truncated\nSVD, rank r", ha="center", va="center", fontsize=9.5)

    # The factors, an nn.Sequential.
    box(ax, 42, 2, 57, 27, "white", edge=MUTED, style="round,pad=0.02,rounding_size=1.2")
    ax.text(70.5, 26.5, "nn.Sequential: conv.0, conv.1 (r = 32)", ha="center", va="center", fontsize=10, weight="bold")
    for left, rows, cols, label in (
        (44, 3, 1, f"Conv2d {KERNEL}×1, {CHANNELS} → r"),
        (72, 1, 3, f"Conv2d 1×{KERNEL}, r → {CHANNELS}"),
    ):
        box(ax, left, 8, 25, 15.5, FACTOR)
        width, height = cols * 2.8, rows * 2.8
        kernel_grid(ax, left + 12.5 - width / 2, 17 - height / 2 + 1.4, rows, cols, 2.8, "#9ccfa2")
        ax.text(left + 12.5, 11.8, label, ha="center", fontsize=10)
        ax.text(left + 12.5, 9.2, f"{FACTOR_WEIGHTS:,} weights", ha="center", fontsize=10, color=MUTED)
    arrow(ax, (69.3, 15.75), (71.7, 15.75))
    total = 2 * FACTOR_WEIGHTS
    ax.text(
        70.5,
        4.4,
        f"{total:,} weights: {DENSE_WEIGHTS / total:.0f}× fewer, same input and output shapes",
        ha="center",
        fontsize=10,
    )


def panel_job(ax):
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 50)
    ax.text(
        0, 49, "(b) A job of N processes: rank 0 decomposes, the others replay", fontsize=12.5, weight="bold", va="top"
    )

    top, bottom, height = 33, 5, 9  # the two lanes
    ax.text(0.5, top + height / 2, "rank 0", fontsize=11, weight="bold", va="center")
    ax.text(0.5, bottom + height / 2, "ranks\n1 … N−1", fontsize=11, weight="bold", va="center")

    # Rank 0.
    box(ax, 11, top, 15, height, RANK_ZERO, "take the\nfile lock", size=9.5)
    arrow(ax, (26.3, top + height / 2), (28.7, top + height / 2))
    box(ax, 29, top, 19, height, RANK_ZERO, "load pretrained,\ndecompose", size=9.5)
    arrow(ax, (48.3, top + height / 2), (50.7, top + height / 2))
    box(ax, 51, top, 16, height, RANK_ZERO, "save info file\nand weights", size=9.5)

    # The shared folder between the lanes.
    box(ax, 51, 18.5, 16, 10, FILES, edge=MUTED)
    ax.text(59, 26.2, "shared folder", ha="center", va="center", fontsize=9, weight="bold")
    ax.text(59, 22.2, "info file, weights,\nmarker (sha256)", ha="center", va="center", fontsize=8.8)
    arrow(ax, (59, top - 0.3), (59, 28.8))

    # The others wait, without any collective.
    box(ax, 11, bottom, 56, height, OTHERS, "wait at the barrier: poll for the marker (no collective)", size=9.5)
    arrow(ax, (67.3, 20.5), (76, bottom + height + 0.4))

    # The barrier.
    ax.plot([69.5, 69.5], [2, 44.5], color=BARRIER, linewidth=1.6, linestyle=(0, (5, 3)))
    ax.text(
        71, 25.5, "barrier:\nthe marker\nis written", ha="left", va="center", fontsize=9.5, color=BARRIER, weight="bold"
    )

    box(ax, 71, bottom, 14, height, OTHERS, "rebuild the\nstructure, load\nthe weights", size=9)
    arrow(ax, (67.3, top + height / 2), (86.7, top + height / 2))

    # Everyone: the same weights checked, then training.
    box(ax, 87, bottom, 12.5, top + height - bottom, TRAIN)
    ax.text(
        93.25,
        (bottom + top + height) / 2,
        "all ranks:\nsame weights\nchecked,\nthen train\n(DDP)",
        ha="center",
        va="center",
        fontsize=9.5,
    )
    arrow(ax, (85.3, bottom + height / 2), (86.7, bottom + height / 2))


def draw(output: Path) -> None:
    figure = plt.figure(figsize=(9.6, 7.4))
    layer = figure.add_axes((0.01, 0.54, 0.98, 0.45))
    job = figure.add_axes((0.01, 0.01, 0.98, 0.52))
    for ax in (layer, job):
        ax.set_axis_off()
    panel_layer(layer)
    panel_job(job)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100, facecolor="white")
    plt.close(figure)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where to write the PNG (default: {OUTPUT})")
    draw(parser.parse_args(argv).output)


if __name__ == "__main__":
    main()
