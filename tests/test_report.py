"""The report stage on hand-written results: table, kNN figure, t-SNE figure and input errors."""

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from threadpoolctl import threadpool_limits

from msvq.checkpoint import save_checkpoint
from msvq.models import resnet18
from msvq.report import ReportError, load_paper_results, make_report
from msvq.report.figures import knn_figure, tsne_figure
from msvq.report.results import read_knn_curve
from msvq.report.table import format_diff
from msvq.report.tsne import checkpoint_features, subsample, tsne_embedding

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "paper_results.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]

HEADER = (
    "| method | CIFAR-10 linear | CIFAR-10 paper | CIFAR-10 diff | CIFAR-10 kNN "
    "| Fashion-MNIST linear | Fashion-MNIST paper | Fashion-MNIST diff | Fashion-MNIST kNN |"
)
SEPARATOR = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
MOCOV2_ROW = "| MoCo v2 | 86.70 | 86.18 | +0.52 | 80.12 | — | — | — | — |"
RESSL_ROW = "| ReSSL | 89.00 | — | — | — | — | — | — | 85.00 |"
MSVQ_ROW = "| MSVQ | 90.16 | 91.46 | −1.30 | 88.00 | 91.50 | — | — | 90.25 |"
RANDOM_ROW = "| Random init | 35.50 | — | — | — | — | — | — | — |"


# Helpers that write the files earlier stages would write.


def write_params(path: Path, data_root: Path, datasets=("cifar10", "fashionmnist"),
                 methods=("mocov2", "ressl", "msvq")) -> Path:
    raw = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    raw["datasets"] = list(datasets)
    raw["methods"] = list(methods)
    raw["data"]["root"] = str(data_root)
    path.write_text(yaml.safe_dump(raw))
    return path


def write_json(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def write_linear(results: Path, dataset: str, method: str, top1: float) -> None:
    write_json(results / dataset / method / "linear" / "metrics.json",
               {"top1": top1, "top5": 99.0, "best_top1": top1 + 0.1, "best_epoch": 90})


def write_pretrain(results: Path, dataset: str, method: str, knn_rows: list[tuple[int, str]], final) -> None:
    directory = results / dataset / method / "pretrain"
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,knn_top1"] + [f"{epoch},{value}" for epoch, value in knn_rows]
    (directory / "knn.csv").write_text("\n".join(lines) + "\n")
    write_json(directory / "metrics.json", {"knn_top1": final, "epochs": len(knn_rows)})


def make_results(results: Path, with_random: bool = True) -> None:
    """Fake results for cifar10 and fashionmnist x mocov2, ressl, msvq, with gaps.

    Missing: fashionmnist/mocov2 entirely, the linear run of fashionmnist/ressl, the final
    kNN of cifar10/ressl (null) and every random baseline but cifar10's.
    """
    write_linear(results, "cifar10", "mocov2", 86.70)
    write_pretrain(results, "cifar10", "mocov2", [(1, "40.5"), (2, ""), (3, "70.25"), (4, "80.123")], 80.123)
    write_linear(results, "cifar10", "ressl", 89.004)
    write_pretrain(results, "cifar10", "ressl", [(1, ""), (2, "")], None)
    write_linear(results, "cifar10", "msvq", 90.16)
    write_pretrain(results, "cifar10", "msvq", [(1, "50.0"), (2, "60.0"), (3, "75.0"), (4, "88.0")], 88.0)

    write_pretrain(results, "fashionmnist", "ressl", [(1, "85.0")], 85.0)
    write_linear(results, "fashionmnist", "msvq", 91.5)
    write_pretrain(results, "fashionmnist", "msvq", [(1, "80.0"), (2, "90.25")], 90.25)

    if with_random:
        write_linear(results, "cifar10", "random", 35.5)


def table_lines(out: Path) -> list[str]:
    return (out / "table.md").read_text().splitlines()


@pytest.fixture
def report_dirs(tmp_path):
    """A params file and a results tree without checkpoints, so no t-SNE runs."""
    results = tmp_path / "results"
    make_results(results)
    params = write_params(tmp_path / "params.yaml", tmp_path / "data")
    return params, results


# The table.


def test_table_markdown_lines(report_dirs):
    params, results = report_dirs

    written = make_report(params, results, paper_path=PAPER)

    lines = table_lines(results)
    start = lines.index(HEADER)
    assert lines[start + 1] == SEPARATOR
    assert lines[start + 2:] == [MOCOV2_ROW, RESSL_ROW, MSVQ_ROW, RANDOM_ROW]
    assert "arXiv 2305.05370" in "\n".join(lines[:start])
    assert written == [
        results / "table.md",
        results / "table.csv",
        results / "figures" / "knn_cifar10.png",
        results / "figures" / "knn_fashionmnist.png",
    ]


def test_table_csv_long_form(report_dirs, tmp_path):
    params, results = report_dirs
    out = tmp_path / "out"

    make_report(params, results, out_dir=out, paper_path=PAPER)

    rows = list(csv.reader(io.StringIO((out / "table.csv").read_text())))
    assert rows == [
        ["method", "dataset", "linear_top1", "paper_linear_top1", "diff", "knn_top1"],
        ["mocov2", "cifar10", "86.70", "86.18", "0.52", "80.12"],
        ["mocov2", "fashionmnist", "", "", "", ""],
        ["ressl", "cifar10", "89.00", "", "", ""],
        ["ressl", "fashionmnist", "", "", "", "85.00"],
        ["msvq", "cifar10", "90.16", "91.46", "-1.30", "88.00"],
        ["msvq", "fashionmnist", "91.50", "", "", "90.25"],
        ["random", "cifar10", "35.50", "", "", ""],
        ["random", "fashionmnist", "", "", "", ""],
    ]
    assert not (results / "table.md").exists()


def test_table_without_random_baseline(tmp_path):
    results = tmp_path / "results"
    make_results(results, with_random=False)
    params = write_params(tmp_path / "params.yaml", tmp_path / "data", methods=("msvq", "mocov2"))

    make_report(params, results, paper_path=PAPER)

    lines = table_lines(results)
    start = lines.index(HEADER)
    assert lines[start + 2:] == [MSVQ_ROW, MOCOV2_ROW]


def test_paper_numbers_come_from_yaml(report_dirs, tmp_path):
    params, results = report_dirs
    paper = yaml.safe_load(PAPER.read_text())
    paper["linear_top1"]["mocov2"]["cifar10"] = 80.0
    paper["linear_top1"]["ressl"] = {"cifar10": 89.004}
    del paper["linear_top1"]["msvq"]
    paper_copy = tmp_path / "paper.yaml"
    paper_copy.write_text(yaml.safe_dump(paper, allow_unicode=True))

    make_report(params, results, paper_path=paper_copy)

    lines = table_lines(results)
    assert "| MoCo v2 | 86.70 | 80.00 | +6.70 | 80.12 | — | — | — | — |" in lines
    # 89.004 rounds to 89.00 on both sides, so the difference is exactly zero.
    assert "| ReSSL | 89.00 | 89.00 | 0.00 | — | — | — | — | 85.00 |" in lines
    assert "| MSVQ | 90.16 | — | — | 88.00 | 91.50 | — | — | 90.25 |" in lines


def test_paper_results_file_values():
    paper = load_paper_results(PAPER)

    assert paper.linear_top1 == {
        ("mocov2", "cifar10"): 86.18, ("mocov2", "cifar100"): 59.51,
        ("mocov2", "stl10"): 85.88, ("mocov2", "tinyimagenet"): 43.36,
        ("msvq", "cifar10"): 91.46, ("msvq", "cifar100"): 66.28,
        ("msvq", "stl10"): 90.36, ("msvq", "tinyimagenet"): 48.09,
    }
    assert paper.knn_top1 == {
        ("mocov2", "cifar10"): 81.0, ("mocov2", "cifar100"): 50.5,
        ("msvq", "cifar10"): 90.0, ("msvq", "cifar100"): 60.5,
    }
    assert paper.knn_epoch == 200
    assert paper.knn_approximate is True


def test_paper_results_rejects_unknown_dataset(tmp_path):
    paper = yaml.safe_load(PAPER.read_text())
    paper["linear_top1"]["msvq"]["cifar-10"] = 91.0
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(paper))

    with pytest.raises(ReportError, match=r"linear_top1\.msvq\.cifar-10 is an unknown dataset"):
        load_paper_results(path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.52, "+0.52"), (-1.3, "−1.30"), (0.0, "0.00"), (-0.0, "0.00"), (None, "—")],
)
def test_format_diff_signs(value, expected):
    assert format_diff(value) == expected


# Corrupt inputs.


@pytest.mark.parametrize(
    ("relative", "content", "message"),
    [
        ("cifar10/msvq/linear/metrics.json", '{"top1": 90.1', "is not valid JSON"),
        ("cifar10/msvq/linear/metrics.json", '{"top5": 99.0}', "has no key 'top1'"),
        ("cifar10/msvq/linear/metrics.json", '{"top1": "high"}', "top1 = 'high' is invalid"),
        ("cifar10/msvq/pretrain/metrics.json", "[88.0]", "must contain a JSON object"),
        ("cifar10/msvq/pretrain/knn.csv", "epoch,knn_top1\n1,50.0\n2,abc\n", "line 3"),
        ("cifar10/msvq/pretrain/knn.csv", "epoch,accuracy\n1,50.0\n", "must have the header"),
    ],
)
def test_corrupt_input_names_file(report_dirs, tmp_path, relative, content, message):
    params, results = report_dirs
    corrupt = results / relative
    corrupt.write_text(content)
    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").write_text("previous table\n")

    with pytest.raises(ReportError) as caught:
        make_report(params, results, out_dir=out, paper_path=PAPER)

    assert str(corrupt) in str(caught.value)
    assert message in str(caught.value)
    assert sorted(path.name for path in out.iterdir()) == ["table.md"]
    assert (out / "table.md").read_text() == "previous table\n"


# The kNN figure.


def test_read_knn_curve_skips_epochs_without_knn(report_dirs):
    _, results = report_dirs

    curve = read_knn_curve(results / "cifar10" / "mocov2" / "pretrain" / "knn.csv")

    assert curve == [(1, 40.5), (3, 70.25), (4, 80.123)]
    assert read_knn_curve(results / "cifar10" / "ressl" / "pretrain" / "knn.csv") == []
    assert read_knn_curve(results / "cifar100" / "msvq" / "pretrain" / "knn.csv") is None


def test_knn_figure_one_line_per_method():
    curves = {
        "msvq": [(1, 50.0), (2, 70.0), (200, 89.5)],
        "ressl": [(1, 45.0), (200, 85.0)],
        "mocov2": [(1, 40.0), (2, 60.0), (200, 80.0)],
    }

    figure = knn_figure("cifar10", curves, {"msvq": 90.0, "mocov2": 81.0, "mq": 88.0}, 200, True)

    axes = figure.axes[0]
    assert [line.get_label() for line in axes.get_lines()] == ["MoCo v2", "ReSSL", "MSVQ"]
    assert list(axes.get_lines()[2].get_xdata()) == [1, 2, 200]
    assert list(axes.get_lines()[2].get_ydata()) == [50.0, 70.0, 89.5]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["MoCo v2", "ReSSL", "MSVQ", "paper, epoch 200 (approx.)"]
    # The paper's kNN values are one scatter, with a cross only for methods that have a curve here (MQ has none).
    (crosses,) = axes.collections
    assert crosses.get_offsets().tolist() == [[200, 81.0], [200, 90.0]]
    assert axes.get_xlabel() == "epoch"
    assert axes.get_ylabel() == "kNN top-1 (%)"
    assert "CIFAR-10" in axes.get_title()


def test_knn_png_size(report_dirs):
    params, results = report_dirs

    make_report(params, results, paper_path=PAPER)

    for dataset in ("cifar10", "fashionmnist"):
        path = results / "figures" / f"knn_{dataset}.png"
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.size == (640, 480)


# The t-SNE figure.


TSNE_TEST_IMAGES = 240
TSNE_POINTS = 200


@pytest.fixture(scope="module")
def tsne_setup(tmp_path_factory):
    """A tiny prepared Fashion-MNIST (16 px) and a width-4 ResNet-18 checkpoint for msvq."""
    base = tmp_path_factory.mktemp("tsne")
    root = base / "data"
    prepared = root / "prepared" / "fashionmnist"
    prepared.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 32), ("test", TSNE_TEST_IMAGES)):
        labels = np.arange(count) % 10
        # Brightness grows with the label, so classes differ in the images.
        images = rng.integers(0, 60, size=(count, 16, 16, 1)) + labels[:, None, None, None] * 19
        np.save(prepared / f"{split}_images.npy", images.astype(np.uint8))
        np.save(prepared / f"{split}_labels.npy", labels.astype(np.int64))
    meta = {
        "format_version": 1, "dataset": "fashionmnist", "classes": FASHION_CLASSES, "num_classes": 10,
        "image_size": [16, 16], "channels": 1, "splits": {"train": 32, "test": TSNE_TEST_IMAGES},
        "mean": [0.4], "std": [0.25], "raw_files": {},
    }
    (prepared / "meta.json").write_text(json.dumps(meta))

    results = base / "results"
    torch.manual_seed(0)
    arch = {"width": 4, "in_channels": 1, "maxpool": False}
    info = {
        "dataset": "fashionmnist", "method": "msvq", "num_classes": 10,
        "params": {"data": {"crop": 16}}, "params_hash": "x", "epochs": 1,
    }
    checkpoint = results / "fashionmnist" / "msvq" / "pretrain" / "checkpoint.pt"
    save_checkpoint(checkpoint, resnet18(**arch), arch, info)
    write_linear(results, "fashionmnist", "msvq", 70.0)

    params = write_params(base / "params.yaml", root, datasets=("fashionmnist",), methods=("msvq", "mocov2"))
    with threadpool_limits(limits=1):
        written = make_report(params, results, paper_path=PAPER, tsne_points=TSNE_POINTS, tsne_perplexity=10)
    return {"root": root, "results": results, "checkpoint": checkpoint, "written": written, "base": base}


def test_tsne_png_from_checkpoint(tsne_setup):
    results = tsne_setup["results"]
    path = results / "figures" / "tsne_fashionmnist_msvq.png"

    assert path in tsne_setup["written"]
    # mocov2 has no checkpoint, so it gets no t-SNE figure.
    assert not (results / "figures" / "tsne_fashionmnist_mocov2.png").exists()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    # The figure is sized to the 640 px map plus the legend of the ten class names.
    same_legend = tsne_figure(np.zeros((10, 2)), np.arange(10), FASHION_CLASSES, "fashionmnist", "msvq")
    expected = tuple(round(inches * 100) for inches in same_legend.get_size_inches())
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == expected
    assert expected[0] > 640 + 100
    assert expected[1] == 640


def test_tsne_features_and_embedding(tsne_setup):
    from msvq.data.prepared import open_prepared

    data = open_prepared(tsne_setup["root"], "fashionmnist")
    indices = subsample(TSNE_TEST_IMAGES, 100, seed=0)

    features = checkpoint_features(tsne_setup["checkpoint"], "fashionmnist", "msvq", data, indices, torch.device("cpu"))
    with threadpool_limits(limits=1):
        first = tsne_embedding(features, seed=0, perplexity=10)
        second = tsne_embedding(features, seed=0, perplexity=10)

    assert features.shape == (100, 32)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    assert first.shape == (100, 2)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_tsne_figure_points_and_legend():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 2, 9], 50)
    embedding = rng.normal(size=(150, 2))

    figure = tsne_figure(embedding, labels, FASHION_CLASSES, "fashionmnist", "msvq")

    axes = figure.axes[0]
    assert sum(len(collection.get_offsets()) for collection in axes.collections) == 150
    legend = figure.legends[0]
    assert [text.get_text() for text in legend.get_texts()] == ["T-shirt/top", "Pullover", "Ankle boot"]
    # The legend sits to the right of the map, not on it.
    figure.draw_without_rendering()
    assert legend.get_window_extent().x0 >= axes.get_window_extent().x1
    assert figure.get_size_inches()[1] == pytest.approx(6.4)


def test_subsample_is_seeded_and_distinct():
    first = subsample(1000, 200, seed=3)

    assert len(first) == 200
    assert len(np.unique(first)) == 200
    assert (np.diff(first) > 0).all()
    np.testing.assert_array_equal(first, subsample(1000, 200, seed=3))
    assert not np.array_equal(first, subsample(1000, 200, seed=4))
    np.testing.assert_array_equal(subsample(50, 200, seed=3), np.arange(50))


def test_tsne_checkpoint_of_other_dataset(tsne_setup, tmp_path):
    from msvq.data.prepared import open_prepared

    data = open_prepared(tsne_setup["root"], "fashionmnist")
    wrong = tmp_path / "checkpoint.pt"
    shutil.copy(tsne_setup["checkpoint"], wrong)

    with pytest.raises(ReportError, match=re.escape(f"{wrong} was trained with dataset 'fashionmnist', method 'msvq'")):
        checkpoint_features(wrong, "cifar10", "msvq", data, np.arange(4), torch.device("cpu"))
