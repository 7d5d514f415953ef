"""The results table: our linear and kNN top-1 beside the published linear top-1.

The published numbers are those of Peng, Long and Li (arXiv 2305.05370), loaded from
config/paper_results.yaml.

table.md has one row per method and four columns per dataset: our last-epoch
linear top-1, the paper's linear top-1, their difference (ours - paper) and our
final kNN top-1. "—" marks a missing run or a number the paper does not report.

table.csv contains the same numbers in long form, one row per (method, dataset),
with the columns method, dataset, linear_top1, paper_linear_top1, diff, knn_top1.
Missing values are empty cells and diff is a plain signed number (-1.30).

All numbers are percentages rounded to 2 decimals. The difference is taken
between the rounded numbers, so it matches what the table shows.
"""

from __future__ import annotations

import csv
import io
import textwrap
from dataclasses import dataclass

from msvq.report.results import RANDOM_METHOD, PaperResults, RunResult

MISSING = "—"
MINUS = "\N{MINUS SIGN}"

METHOD_NAMES = {
    "mocov2": "MoCo v2",
    "ressl": "ReSSL",
    "msv": "MSV",
    "mq": "MQ",
    "msvq": "MSVQ",
    RANDOM_METHOD: "Random init",
}
DATASET_NAMES = {
    "cifar10": "CIFAR-10",
    "cifar100": "CIFAR-100",
    "stl10": "STL-10",
    "tinyimagenet": "Tiny ImageNet",
    "fashionmnist": "Fashion-MNIST",
}
CSV_COLUMNS = ("method", "dataset", "linear_top1", "paper_linear_top1", "diff", "knn_top1")


@dataclass(frozen=True)
class TableRow:
    """The numbers of one (method, dataset) pair, rounded to 2 decimals; None where missing."""

    method: str
    dataset: str
    linear_top1: float | None
    paper_linear_top1: float | None
    diff: float | None
    knn_top1: float | None


def method_name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def dataset_name(dataset: str) -> str:
    return DATASET_NAMES.get(dataset, dataset)


def table_rows(
    results: dict[tuple[str, str], RunResult],
    paper: PaperResults,
    methods: list[str],
    datasets: list[str],
) -> list[TableRow]:
    """Pair every (method, dataset) result with the published number, ordered by method, then dataset."""
    rows = []
    for method in methods:
        for dataset in datasets:
            result = results.get((method, dataset), RunResult())
            ours = rounded(result.linear_top1)
            theirs = rounded(paper.linear_top1.get((method, dataset)))
            diff = None if ours is None or theirs is None else round(ours - theirs, 2)
            rows.append(TableRow(method, dataset, ours, theirs, diff, rounded(result.knn_top1)))
    return rows


def render_markdown(rows: list[TableRow], methods: list[str], datasets: list[str], source: str) -> str:
    """Render the rows as a GitHub-flavoured Markdown table with a short legend above it."""
    by_key = {(row.method, row.dataset): row for row in rows}
    header = ["method"]
    for dataset in datasets:
        name = dataset_name(dataset)
        header += [f"{name} linear", f"{name} paper", f"{name} diff", f"{name} kNN"]

    legend = (
        "Top-1 accuracy (%) on the test split. linear: our linear evaluation of the frozen backbone "
        f"after the last epoch. paper: the linear top-1 reported by {source}. diff: linear {MINUS} paper. "
        f"kNN: our kNN top-1 after the last pretraining epoch. {MISSING}: no run, or no number in the paper."
    )
    lines = [
        "# Results",
        "",
        textwrap.fill(legend, width=88),
        "",
        table_line(header),
        table_line(["---"] + ["---:"] * (len(header) - 1)),
    ]
    for method in methods:
        cells = [method_name(method)]
        for dataset in datasets:
            row = by_key[(method, dataset)]
            cells += [
                format_number(row.linear_top1),
                format_number(row.paper_linear_top1),
                format_diff(row.diff),
                format_number(row.knn_top1),
            ]
        lines.append(table_line(cells))
    return "\n".join(lines) + "\n"


def render_csv(rows: list[TableRow]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        numbers = (row.linear_top1, row.paper_linear_top1, row.diff, row.knn_top1)
        writer.writerow([row.method, row.dataset, *("" if value is None else f"{value:.2f}" for value in numbers)])
    return buffer.getvalue()


def table_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def format_number(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}"


def format_diff(value: float | None) -> str:
    """Format a difference with an explicit sign: +0.52, −1.30 (Unicode minus), 0.00."""
    if value is None:
        return MISSING
    if value == 0:
        return "0.00"
    sign = "+" if value > 0 else MINUS
    return f"{sign}{abs(value):.2f}"
