"""The report stage: the results table, the kNN curves and the t-SNE maps.

make_report reads RESULTS/<dataset>/<method>/{pretrain,linear}/ for every dataset and
method of the params file (plus the random-initialisation baseline, method
``random``, when it has linear results) and writes into OUT:

    table.md, table.csv                 ours beside the published linear top-1
    figures/knn_<dataset>.png           kNN top-1 per epoch, one line per method
    figures/tsne_<dataset>_<method>.png t-SNE of the test-split backbone features

Every metrics.json and knn.csv is read and checked before anything is written, so a
corrupt input leaves the previous outputs as they were. Missing runs are logged and
shown as "—" or skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

from msvq.config import Params, load_params
from msvq.data.prepared import open_prepared
from msvq.device import select_device
from msvq.io import write_text
from msvq.report.figures import knn_figure, ordered_methods, save_png, tsne_figure
from msvq.report.results import (
    RANDOM_METHOD,
    PaperResults,
    ReportError,
    RunResult,
    linear_dir,
    load_paper_results,
    pretrain_dir,
    read_run,
)
from msvq.report.table import render_csv, render_markdown, table_rows
from msvq.report.tsne import checkpoint_features, subsample, tsne_embedding

__all__ = ["ReportError", "load_paper_results", "make_report"]

log = logging.getLogger(__name__)


def make_report(
    params_path: str | Path,
    results_dir: str | Path,
    out_dir: str | Path | None = None,
    paper_path: str | Path = "config/paper_results.yaml",
    tsne_points: int | None = None,
    device: str = "cpu",
    tsne_perplexity: float | None = None,
) -> list[Path]:
    """Write the table, the kNN figures and the t-SNE figures; return the files written.

    ``out_dir`` defaults to ``results_dir``. Each t-SNE map uses at most ``tsne_points``
    test images, drawn with the run's pretrain.seed, which also seeds t-SNE.
    ``tsne_perplexity`` is scikit-learn's perplexity. Both default to the params file's
    report section. Raises ReportError for a corrupt metrics.json, knn.csv or paper
    results file.
    """
    params = load_params(params_path)
    if tsne_points is None:
        tsne_points = params.raw["report"]["tsne_points"]
    if tsne_perplexity is None:
        tsne_perplexity = params.raw["report"]["tsne_perplexity"]
    if tsne_points < 1:
        raise ValueError(f"tsne_points must be at least 1, got {tsne_points}")
    results_dir = Path(results_dir)
    out_dir = results_dir if out_dir is None else Path(out_dir)

    paper = load_paper_results(paper_path)
    results, methods = collect_results(params, results_dir)

    written = write_tables(out_dir, results, paper, methods, list(params.datasets))
    written += write_knn_figures(out_dir, params, results, paper)
    written += write_tsne_figures(out_dir, params, results_dir, tsne_points, tsne_perplexity, device)
    return written


def collect_results(params: Params, results_dir: Path) -> tuple[dict[tuple[str, str], RunResult], list[str]]:
    """Read every run's results; return them by (method, dataset) and the table's methods.

    The methods are those of the params file, followed by ``random`` when any dataset
    has a random-initialisation baseline.
    """
    methods = list(params.methods)
    if any((linear_dir(results_dir, dataset, RANDOM_METHOD) / "metrics.json").is_file() for dataset in params.datasets):
        methods.append(RANDOM_METHOD)

    results = {}
    for method in methods:
        for dataset in params.datasets:
            result = read_run(results_dir, dataset, method)
            if result.linear_top1 is None:
                log.info("no linear results for %s/%s in %s; the table shows —", dataset, method, results_dir)
            results[(method, dataset)] = result
    return results, methods


def write_tables(
    out_dir: Path,
    results: dict[tuple[str, str], RunResult],
    paper: PaperResults,
    methods: list[str],
    datasets: list[str],
) -> list[Path]:
    rows = table_rows(results, paper, methods, datasets)
    markdown = render_markdown(rows, methods, datasets, paper.source)
    written = []
    for path, text in ((out_dir / "table.md", markdown), (out_dir / "table.csv", render_csv(rows))):
        write_text(path, text)
        log.info("wrote %s", path)
        written.append(path)
    return written


def write_knn_figures(
    out_dir: Path,
    params: Params,
    results: dict[tuple[str, str], RunResult],
    paper: PaperResults,
) -> list[Path]:
    written = []
    for dataset in params.datasets:
        curves = {
            method: results[(method, dataset)].knn_curve
            for method in ordered_methods(params.methods)
            if results[(method, dataset)].knn_curve
        }
        if not curves:
            log.info("no kNN values in any knn.csv for %s; skipping its kNN figure", dataset)
            continue
        paper_knn = {method: value for (method, name), value in paper.knn_top1.items() if name == dataset}
        figure = knn_figure(dataset, curves, paper_knn, paper.knn_epoch, paper.knn_approximate)
        path = out_dir / "figures" / f"knn_{dataset}.png"
        save_png(figure, path)
        log.info("wrote %s (%d methods)", path, len(curves))
        written.append(path)
    return written


def write_tsne_figures(
    out_dir: Path,
    params: Params,
    results_dir: Path,
    max_points: int,
    perplexity: float,
    device: str,
) -> list[Path]:
    jobs = []
    for dataset in params.datasets:
        for method in params.methods:
            checkpoint = pretrain_dir(results_dir, dataset, method) / "checkpoint.pt"
            if checkpoint.is_file():
                jobs.append((dataset, method, checkpoint))
            else:
                log.info("no checkpoint at %s; skipping the t-SNE figure of %s/%s", checkpoint, dataset, method)
    if not jobs:
        return []

    torch_device = select_device(device)
    written = []
    for dataset, method, checkpoint in tqdm(jobs, desc="t-SNE", unit="figure"):
        run = params.run(dataset, method)
        seed = run.pretrain.seed
        data = open_prepared(run.data.root, dataset)
        labels = data.labels("test")
        indices = subsample(len(labels), max_points, seed)

        features = checkpoint_features(checkpoint, dataset, method, data, indices, torch_device)
        embedding = tsne_embedding(features, seed, perplexity)

        figure = tsne_figure(embedding, labels[indices], data.classes, dataset, method)
        path = out_dir / "figures" / f"tsne_{dataset}_{method}.png"
        save_png(figure, path)
        log.info("wrote %s (%d points)", path, len(indices))
        written.append(path)
    return written
