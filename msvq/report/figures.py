"""The report's figures: kNN top-1 per pretraining epoch, and t-SNE maps of backbone features.

Figures are built on matplotlib.figure.Figure directly, not through pyplot, so no
global figure state or GUI backend is involved. Each function returns the Figure and
save_png writes it. Sizes are in inches at DPI dots per inch, so a figure of
(6.4, 4.8) inches is a 640 x 480 pixel PNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from msvq.io import atomic_path
from msvq.report.table import dataset_name, method_name

DPI = 100
KNN_FIGSIZE = (6.4, 4.8)
# The order of the methods in the kNN legend, baselines first and MSVQ last.
KNN_METHOD_ORDER = ("mocov2", "ressl", "msv", "mq", "msvq")
# Curves with at most this many points also get a marker on each point, so a run
# with a single kNN pass still shows up.
MARKER_MAX_POINTS = 30

# The t-SNE map is a square of this many inches; the legend widens the figure to its right.
TSNE_MAP_SIZE = 6.4
TSNE_LEGEND_ROWS = 25
# Inches between the map and the legend, and after the legend.
TSNE_LEGEND_PAD = 0.3


@contextmanager
def report_style() -> Iterator[None]:
    """Apply seaborn's whitegrid style and notebook font sizes (11-12 pt) to figures made inside."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook"):
        yield


def method_colors() -> dict[str, tuple[float, float, float]]:
    """Give each method the same colour in every figure."""
    palette = sns.color_palette("colorblind", len(KNN_METHOD_ORDER))
    return dict(zip(KNN_METHOD_ORDER, palette))


def ordered_methods(methods) -> list[str]:
    """Sort method names into KNN_METHOD_ORDER; names outside it follow in the order given."""
    known = [method for method in KNN_METHOD_ORDER if method in methods]
    return known + [method for method in methods if method not in KNN_METHOD_ORDER]


def knn_figure(
    dataset: str,
    curves: dict[str, list[tuple[int, float]]],
    paper_knn: dict[str, float] | None = None,
    paper_epoch: int | None = None,
    paper_approximate: bool = False,
) -> Figure:
    """Plot kNN top-1 against epoch, one line per method in ``curves``.

    ``paper_knn`` maps methods to the published kNN top-1 at ``paper_epoch``. Those are
    drawn as crosses in the method's colour (a scatter, so the figure's Line2D objects
    are exactly the method curves), for methods that also have a curve here.
    """
    colors = method_colors()
    with report_style():
        figure = Figure(figsize=KNN_FIGSIZE, dpi=DPI, layout="constrained")
        axes = figure.add_subplot()

        for method in ordered_methods(curves):
            epochs = [epoch for epoch, _ in curves[method]]
            values = [value for _, value in curves[method]]
            marker = "o" if len(epochs) <= MARKER_MAX_POINTS else None
            axes.plot(epochs, values, label=method_name(method), color=colors.get(method), marker=marker,
                      markersize=4, linewidth=1.8)

        paper_methods = [method for method in ordered_methods(curves) if method in (paper_knn or {})]
        if paper_methods and paper_epoch is not None:
            axes.scatter(
                [paper_epoch] * len(paper_methods),
                [paper_knn[method] for method in paper_methods],
                c=[colors.get(method, "0.3") for method in paper_methods],
                marker="x", s=70, linewidths=2, zorder=3,
            )
            label = f"paper, epoch {paper_epoch}" + (" (approx.)" if paper_approximate else "")
            handles, labels = axes.get_legend_handles_labels()
            proxy = Line2D([], [], color="0.3", marker="x", markersize=8, markeredgewidth=2, linestyle="none")
            axes.legend(handles + [proxy], labels + [label], loc="best")
        else:
            axes.legend(loc="best")

        axes.set_xlabel("epoch")
        axes.set_ylabel("kNN top-1 (%)")
        axes.set_title(f"kNN top-1 during pretraining, {dataset_name(dataset)}")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        # Start at epoch 0 so a run with one kNN pass still gets a readable epoch axis.
        axes.set_xlim(left=0)
    return figure


def class_palette(num_classes: int) -> list[tuple[float, float, float]]:
    """Return distinct colours: tab10 or tab20 up to 20 classes, evenly spaced hues beyond."""
    if num_classes <= 10:
        return sns.color_palette("tab10", num_classes)
    if num_classes <= 20:
        return sns.color_palette("tab20", num_classes)
    # NOTE: beyond about 20 classes neighbouring hues are hard to tell apart; the map
    # then shows cluster structure more than which class is which.
    return sns.color_palette("husl", num_classes)


def tsne_figure(
    embedding: np.ndarray,
    labels: np.ndarray,
    classes: list[str],
    dataset: str,
    method: str,
) -> Figure:
    """Scatter a 2-D t-SNE embedding (N, 2) coloured by class, with the class names in a legend.

    ``labels`` (N,) index into ``classes``; only the classes that occur get a legend entry.
    """
    if embedding.ndim != 2 or embedding.shape[1] != 2 or len(embedding) != len(labels):
        raise ValueError(f"expected an (N, 2) embedding and N labels, got {embedding.shape} and {labels.shape}")
    palette = class_palette(len(classes))
    with report_style():
        figure = Figure(figsize=(TSNE_MAP_SIZE, TSNE_MAP_SIZE), dpi=DPI, layout="constrained")
        axes = figure.add_subplot()

        for index in np.unique(labels):
            points = embedding[labels == index]
            axes.scatter(points[:, 0], points[:, 1], s=4, color=palette[index], linewidths=0,
                         label=classes[index])

        # t-SNE coordinates have no units, so the ticks carry no information.
        axes.set_xticks([])
        axes.set_yticks([])
        axes.set_title(
            f"t-SNE of {method_name(method)} features, {dataset_name(dataset)} test split ({len(labels)} images)"
        )
        axes.set_aspect("equal", adjustable="datalim")
        legend = figure.legend(
            loc="outside right upper",
            ncols=math.ceil(len(np.unique(labels)) / TSNE_LEGEND_ROWS),
            fontsize=10,
            markerscale=3,
            frameon=False,
            title="class",
        )

        # Widen the figure by the legend's measured width, rounded up to whole pixels,
        # so the map keeps its size however long the class names are.
        legend_width = legend.get_window_extent().width
        width_pixels = math.ceil(TSNE_MAP_SIZE * DPI + legend_width + TSNE_LEGEND_PAD * DPI)
        figure.set_size_inches(width_pixels / DPI, TSNE_MAP_SIZE)
    return figure


def save_png(figure: Figure, path: Path) -> None:
    """Write ``figure`` to ``path`` as a PNG; the file appears only when complete."""
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
