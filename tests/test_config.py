import copy
from pathlib import Path

import pytest
import yaml

from msvq.cli import main
from msvq.config import ParamsError, load_params

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "params.yaml"
DEMO = REPO / "config" / "demo.yaml"


def paper_raw() -> dict:
    return yaml.safe_load(PAPER.read_text())


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def set_key(raw: dict, dotted: str, value) -> dict:
    raw = copy.deepcopy(raw)
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return raw


def test_paper_params_match_protocol():
    params = load_params(PAPER)
    assert params.datasets == ("cifar10", "cifar100", "stl10", "tinyimagenet")
    assert set(params.methods) == {"mocov2", "ressl", "msv", "mq", "msvq"}

    cifar10 = params.run("cifar10", "msvq")
    assert (cifar10.method.m1, cifar10.method.m2, cifar10.method.tau_t) == (0.99, 0.95, 0.04)
    assert cifar10.method.queue_size == 4096
    assert cifar10.data.crop == 32
    assert cifar10.pretrain.epochs == 200
    assert cifar10.pretrain.batch_size == 256
    assert cifar10.pretrain.lr == 0.06
    assert cifar10.pretrain.weight_decay == 5e-4
    assert cifar10.pretrain.warmup_epochs == 5
    assert cifar10.method.tau_s == 0.1
    assert cifar10.model.bn_splits == 8
    assert (cifar10.linear.epochs, cifar10.linear.lr, cifar10.linear.nesterov) == (100, 1.0, True)

    cifar100 = params.run("cifar100", "msvq")
    assert (cifar100.method.m2, cifar100.method.tau_t) == (0.93, 0.03)

    for dataset in ("stl10", "tinyimagenet"):
        run = params.run(dataset, "msvq")
        assert (run.method.m1, run.method.m2, run.method.queue_size, run.data.crop) == (0.996, 0.99, 16384, 64)


def test_method_override_applies_after_dataset_override():
    params = load_params(PAPER)
    moco_stl = params.run("stl10", "mocov2")
    assert moco_stl.method.m1 == 0.99
    assert moco_stl.method.tau_s == 0.2
    assert moco_stl.method.queue_size == 4096
    assert moco_stl.data.crop == 64


def test_demo_params_are_valid():
    params = load_params(DEMO)
    assert params.datasets == ("fashionmnist",)
    assert params.run("fashionmnist", "msvq").data.crop == 28


def test_digest_tracks_only_named_sections(tmp_path):
    params = load_params(PAPER)
    base = params.run("cifar10", "msvq")
    raw = set_key(paper_raw(), "linear.epochs", 50)
    changed = load_params(write(tmp_path, raw)).run("cifar10", "msvq")
    assert base.digest("data", "model", "pretrain", "method") == changed.digest("data", "model", "pretrain", "method")
    assert base.digest("linear") != changed.digest("linear")


def test_dataset_override_changes_only_that_dataset(tmp_path):
    raw = set_key(paper_raw(), "overrides.datasets.cifar100.pretrain", {"epochs": 10})
    before, after = load_params(PAPER), load_params(write(tmp_path, raw))
    sections = ("data", "model", "pretrain", "method")
    assert before.run("cifar10", "msvq").digest(*sections) == after.run("cifar10", "msvq").digest(*sections)
    assert before.run("cifar100", "msvq").digest(*sections) != after.run("cifar100", "msvq").digest(*sections)


INVALID = [
    ("method.m1", 1.0, "method.m1"),
    ("method.m2", -0.1, "method.m2"),
    ("method.tau_t", 0, "method.tau_t"),
    ("method.tau_s", -1.0, "method.tau_s"),
    ("pretrain.epochs", 0, "pretrain.epochs"),
    ("pretrain.batch_size", 1, "pretrain.batch_size"),
    ("pretrain.device", "tpu", "pretrain.device"),
    ("pretrain.precision", "fp16", "pretrain.precision"),
    ("pretrain.lr", "fast", "pretrain.lr"),
    ("linear.mode", "finetune", "linear.mode"),
    ("data.crop", 4, "data.crop"),
    ("datasets", ["imagenet"], "datasets.0 = 'imagenet'"),
    ("methods", ["byol"], "methods.0 = 'byol'"),
    ("overrides.datasets.cifar10.method.m1", 1.5, "overrides.datasets.cifar10.method.m1"),
]


@pytest.mark.parametrize("key,value,path", INVALID)
def test_invalid_value_names_key_path(tmp_path, key, value, path):
    file = write(tmp_path, set_key(paper_raw(), key, value))
    with pytest.raises(ParamsError) as error:
        load_params(file)
    message = str(error.value)
    assert path in message
    if not isinstance(value, list):
        assert f"{path} = {value!r}" in message
    assert str(file) in message


UNKNOWN = [
    ("pretrain.epoch", 10, "pretrain.epoch"),
    ("bogus", 1, "bogus"),
    ("overrides.datasets.cifar10.method.queue", 10, "overrides.datasets.cifar10.method.queue"),
    ("overrides.methods.msvq.optimizer", {"lr": 1}, "overrides.methods.msvq.optimizer"),
]


@pytest.mark.parametrize("key,value,path", UNKNOWN)
def test_unknown_key_names_key_path(tmp_path, key, value, path):
    file = write(tmp_path, set_key(paper_raw(), key, value))
    with pytest.raises(ParamsError, match="unknown key") as error:
        load_params(file)
    assert path in str(error.value)


def test_unknown_dataset_in_overrides_is_rejected(tmp_path):
    file = write(tmp_path, set_key(paper_raw(), "overrides.datasets.imagenet", {"data": {"crop": 64}}))
    with pytest.raises(ParamsError, match="imagenet"):
        load_params(file)


CROSS_FIELD = [
    ({"pretrain.batch_size": 384}, "method.queue_size = 4096 must be a positive multiple of pretrain.batch_size = 384"),
    ({"model.bn_splits": 3}, "pretrain.batch_size = 256 must be divisible by model.bn_splits = 3"),
    ({"pretrain.warmup_epochs": 200}, "pretrain.warmup_epochs = 200"),
    ({"data.train_subset": 100}, "data.train_subset = 100"),
    ({"overrides.datasets.stl10.method.queue_size": 4000}, "dataset stl10"),
]


@pytest.mark.parametrize("changes,fragment", CROSS_FIELD)
def test_cross_field_rules(tmp_path, changes, fragment):
    raw = paper_raw()
    for key, value in changes.items():
        raw = set_key(raw, key, value)
    with pytest.raises(ParamsError) as error:
        load_params(write(tmp_path, raw))
    assert fragment in str(error.value)


def test_missing_required_key(tmp_path):
    raw = paper_raw()
    del raw["pretrain"]["lr"]
    with pytest.raises(ParamsError, match="'lr' is a required property"):
        load_params(write(tmp_path, raw))


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("pretrain: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def test_cli_check_params_reports_key(tmp_path, capsys):
    file = write(tmp_path, set_key(paper_raw(), "method.m1", 1.0))
    assert main(["check-params", str(file)]) == 1
    assert "method.m1" in capsys.readouterr().err
    assert main(["check-params", str(PAPER)]) == 0
