"""Pictures: the precision-recall curve, the retrieval grid of eval.py, search hit strips."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from csce_jax.data.base import Source
from csce_jax.data.images import center_crop, load_rgb
from csce_jax.data.pipeline import ViewConfig, resized_image
from csce_jax.retrieval import metrics

PR_CURVE_SIZE = (600, 450)  # pixels of pr_curve.png
GRID_CELL = 96  # pixels per image in retrieval_grid.png (plus a 4-pixel frame)
GRID_TOPK = 10
RELEVANT, IRRELEVANT = (30, 160, 60), (210, 40, 40)
QUERY_FRAME = (40, 90, 220)  # the query tile of a hits strip


def plot_pr_curve(curve: dict[str, list[float]], path: str, title: str) -> None:
    """Precision against recall over Hamming radius, as a PNG of PR_CURVE_SIZE pixels.

    The solid curve averages precision over the queries that retrieve something within the
    radius (what a precision-recall curve is read as); the dashed one counts a query that
    retrieves nothing as precision 0 (the hashing papers' convention, ``precision``), which is
    why it starts near 0 at small radii. A few radii are marked on the solid curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w, h = PR_CURVE_SIZE
    fig, ax = plt.subplots(figsize=(w / 100, h / 100), dpi=100)
    recall = curve["recall"]
    answered = curve.get("precision_answered")
    if answered is not None:
        ax.plot(recall, answered, marker=".", label="queries retrieving something within r")
        bits = len(recall) - 1
        for r in sorted({0, 2, bits // 4, bits // 2}):
            ax.annotate(
                f"r={r}",
                (recall[r], answered[r]),
                fontsize=7,
                xytext=(4, 4),
                textcoords="offset points",
            )
    ax.plot(
        recall,
        curve["precision"],
        "--",
        color="gray",
        label="every query (precision 0 where none is retrieved)",
    )
    ax.set_xlabel("recall (everything within Hamming radius r)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(series: dict[str, list[float]], path: str, title: str) -> None:
    """Named curves over steps (1, 2, ...) on one log-scaled axis, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for name, values in series.items():
        style = "--" if "torch" in name else "-"
        ax.plot(range(1, len(values) + 1), values, style, label=name)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_group_errors(
    points: list[tuple[str, dict[str, dict[str, float]]]], path: str, title: str
) -> None:
    """Per group, the median relative error of our float32 side beside PyTorch float32's
    (both against float64), one panel per comparison point, log-scaled, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points[0][1])
    fig, axes = plt.subplots(
        1, len(points), figsize=(6 * len(points), 0.28 * len(names) + 1.5), dpi=100, squeeze=False
    )
    y = np.arange(len(names))
    for ax, (label, groups) in zip(axes[0], points, strict=True):
        ours = [max(groups[g]["median_ours"], 1e-12) for g in names]
        torch32 = [max(groups[g]["median_torch32"], 1e-12) for g in names]
        ax.barh(y - 0.2, ours, height=0.4, label="ours (JAX float32)", color="tab:blue")
        ax.barh(y + 0.2, torch32, height=0.4, label="PyTorch float32", color="tab:orange")
        for i, g in enumerate(names):
            if not groups[g]["ok"]:
                ax.text(ours[i], y[i] - 0.2, "  x", va="center", color="red")
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("median relative error against PyTorch float64")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tile(src: Source, i: int, view: ViewConfig) -> Image.Image:
    arr = center_crop(resized_image(src, int(i), view), view.crop)
    return Image.fromarray(arr).resize((GRID_CELL, GRID_CELL))


def retrieval_grid(
    query_src: Source,
    db_src: Source,
    query: dict[str, np.ndarray],
    database: dict[str, np.ndarray],
    rows: list[int],
    path: str,
    view: ViewConfig,
) -> tuple[int, int]:
    """Each row: a query, then its top GRID_TOPK results framed green (relevant) or red.

    ``rows`` are query record indices. Returns the (width, height) of the PNG written.
    """
    cell = GRID_CELL + 8
    width, height = cell * (GRID_TOPK + 1) + 12, cell * len(rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    q_idx = np.searchsorted(query["index"], rows)
    dist = metrics.hamming_distances(query["codes"][q_idx], database["codes"])
    rel = metrics.relevance_fn(query["labels"][q_idx], database["labels"])(slice(None))
    for r, qi in enumerate(q_idx):
        y = r * cell
        canvas.paste(_tile(query_src, query["index"][qi], view), (4, y + 4))
        draw.rectangle([0, y, cell - 1, y + cell - 1], outline="black", width=4)
        order = np.argsort(dist[r], kind="stable")[:GRID_TOPK]
        for c, j in enumerate(order, 1):
            x = c * cell + 12
            canvas.paste(_tile(db_src, database["index"][j], view), (x + 4, y + 4))
            color = RELEVANT if rel[r, j] else IRRELEVANT
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=color, width=4)
    canvas.save(path)
    return width, height


def hits_strip(
    paths: list[str], out: str, cell: int = 128, captions: list[str] | None = None
) -> None:
    """A query image (framed blue) followed by its hits, side by side, as one PNG; each tile
    is captioned below (``captions``, e.g. "query", "d=3 label") when given."""
    band = 16 if captions else 0
    canvas = Image.new("RGB", (cell * len(paths) + 8, cell + band), "white")
    draw = ImageDraw.Draw(canvas)
    for i, p in enumerate(paths):
        x = i * cell + (8 if i else 0)
        canvas.paste(load_rgb(p).resize((cell - 4, cell - 4)), (x + 2, 2))
        if i == 0:
            draw.rectangle([0, 0, cell - 1, cell - 1], outline=QUERY_FRAME, width=4)
        if captions:
            draw.text((x + 4, cell + 2), captions[i][:20], fill="black")
    canvas.save(out)
