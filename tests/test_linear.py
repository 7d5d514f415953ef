"""Linear evaluation: the classifier on known features, and msvq linear-eval end to end."""

import csv
import json

import pytest
import torch

from msvq.cli import main
from msvq.config import load_params
from msvq.linear import linear_eval, train_classifier
from msvq.pretrain import pretrain
from tests.tiny import tiny_params, write_params


def feature_batches(features, labels, batch_size=64):
    def batches(epoch):
        order = torch.randperm(len(features), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            yield features[index], labels[index]

    return batches


def linear_run(tmp_path, tiny_root, **linear):
    raw = tiny_params(tiny_root)
    raw["linear"].update(linear)
    return load_params(write_params(tmp_path / "p.yaml", raw)).run("fashionmnist", "msvq")


def clusters(num_classes, per_class, dim, generator):
    centres = 4.0 * torch.randn(num_classes, dim, generator=generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 0.5 * torch.randn(len(labels), dim, generator=generator), labels


def test_separable_features_reach_high_accuracy(tmp_path, tiny_root):
    run = linear_run(tmp_path, tiny_root, epochs=10, lr=0.1)
    generator = torch.Generator().manual_seed(0)
    train, train_labels = clusters(10, 100, 32, generator)
    test, test_labels = clusters(10, 20, 32, generator.manual_seed(0))

    rows = train_classifier(feature_batches(train, train_labels), test, test_labels, 32, 10, run, steps_per_epoch=16)

    assert len(rows) == 10
    assert rows[-1]["top1"] > 95.0
    assert rows[-1]["top5"] >= rows[-1]["top1"]
    assert rows[-1]["lr"] < rows[0]["lr"]


def test_random_labels_stay_near_chance(tmp_path, tiny_root):
    run = linear_run(tmp_path, tiny_root, epochs=10, lr=0.1)
    generator = torch.Generator().manual_seed(1)
    train = torch.randn(1000, 32, generator=generator)
    test = torch.randn(1000, 32, generator=generator)
    train_labels = torch.randint(0, 10, (1000,), generator=generator)
    test_labels = torch.randint(0, 10, (1000,), generator=generator)

    rows = train_classifier(feature_batches(train, train_labels), test, test_labels, 32, 10, run, steps_per_epoch=16)

    assert 4.0 < rows[-1]["top1"] < 16.0


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_root):
    base = tmp_path_factory.mktemp("linear")
    raw = tiny_params(tiny_root, epochs=2, knn_every=0)
    params = load_params(write_params(base / "p.yaml", raw))
    pretrain(params.run("fashionmnist", "msvq"), base / "pretrain")
    return base / "pretrain" / "checkpoint.pt"


@pytest.mark.parametrize("mode", ["features", "augmented"])
def test_linear_eval_writes_metrics_and_curve(tmp_path, tiny_root, tiny_checkpoint, mode):
    raw = tiny_params(tiny_root)
    raw["linear"].update(epochs=3, batch_size=64)
    params = write_params(tmp_path / "p.yaml", raw)
    out = tmp_path / "linear"

    code = main(["linear-eval", "--dataset", "fashionmnist", "--method", "msvq", "--checkpoint",
                 str(tiny_checkpoint), "--params", str(params), "--out", str(out), "--mode", mode])

    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    with (out / "curve.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert metrics["top1"] == float(rows[-1]["top1"])
    assert metrics["top5"] == float(rows[-1]["top5"])
    assert metrics["best_top1"] == max(float(row["top1"]) for row in rows)
    assert float(rows[metrics["best_epoch"] - 1]["top1"]) == metrics["best_top1"]
    assert metrics["mode"] == mode
    assert 0.0 <= metrics["top1"] <= metrics["top5"] <= 100.0


def test_random_checkpoint_is_a_baseline(tmp_path, tiny_root):
    raw = tiny_params(tiny_root)
    raw["linear"].update(epochs=1)
    params = write_params(tmp_path / "p.yaml", raw)

    code = main(["linear-eval", "--dataset", "fashionmnist", "--method", "random", "--checkpoint", "random",
                 "--params", str(params), "--out", str(tmp_path / "out")])

    assert code == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["checkpoint"] == "random"
    assert metrics["method"] == "random"


def linear_eval_cli(tmp_path, tiny_root, checkpoint) -> int:
    """Run `msvq linear-eval` on the tiny dataset with ``checkpoint``, writing to tmp_path/out."""
    params = write_params(tmp_path / "p.yaml", tiny_params(tiny_root))
    return main(["linear-eval", "--dataset", "fashionmnist", "--method", "msvq", "--checkpoint", str(checkpoint),
                 "--params", str(params), "--out", str(tmp_path / "out")])


def tampered_checkpoint(source, target, change):
    """Save a copy of checkpoint ``source`` at ``target`` after ``change(payload)``."""
    payload = torch.load(source, weights_only=True)
    change(payload)
    torch.save(payload, target)
    return target


def test_checkpoint_of_other_dataset_is_rejected(tmp_path, tiny_root, tiny_checkpoint, capsys):
    wrong = tampered_checkpoint(tiny_checkpoint, tmp_path / "cifar10.pt", lambda p: p.update(dataset="cifar10"))

    code = linear_eval_cli(tmp_path, tiny_root, wrong)

    assert code == 1
    err = capsys.readouterr().err
    assert str(wrong) in err
    assert "'cifar10', not on 'fashionmnist'" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_with_wrong_architecture_is_rejected(tmp_path, tiny_root, tiny_checkpoint, capsys):
    wrong = tampered_checkpoint(tiny_checkpoint, tmp_path / "wide.pt", lambda p: p["arch"].update(width=8))

    code = linear_eval_cli(tmp_path, tiny_root, wrong)

    assert code == 1
    err = capsys.readouterr().err
    assert str(wrong) in err
    assert "weights do not fit ResNet-18" in err
    assert "size mismatch for conv1.weight" in err
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint_names_file(tmp_path, tiny_root, capsys):
    code = linear_eval_cli(tmp_path, tiny_root, tmp_path / "absent.pt")
    assert code == 1
    assert f"checkpoint not found: {tmp_path / 'absent.pt'}" in capsys.readouterr().err


def test_random_bytes_checkpoint_is_rejected(tmp_path, tiny_root, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(bytes(range(256)) * 20)

    code = linear_eval_cli(tmp_path, tiny_root, garbage)

    assert code == 1
    err = capsys.readouterr().err
    assert f"{garbage} cannot be loaded with torch.load(weights_only=True)" in err
    assert "(Unsupported operand 0)" in err
    assert "weights_only` set to `False`" not in err
    assert not (tmp_path / "out").exists()
