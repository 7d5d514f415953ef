"""Import of checkpoints saved by the original MSVQ code (github.com/pc-cp/MSVQ).

The original networks are rebuilt here the way its network/base_model.py and
network/msvq.py build them. Its network/resnet.py is a copy of torchvision's resnet.py,
so these tests build the ResNet-18 with torchvision's resnet18.
"""

import copy
import os
import shlex
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from msvq.checkpoint import FORMAT, CheckpointError, build_backbone, load_checkpoint
from msvq.data.registry import DATASETS
from msvq.import_checkpoint import DATASET_FACTS, import_original_checkpoint, to_msvq_key, to_original_key
from msvq.models import resnet18

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

PROJ_HIDDEN, PROJ_DIM = 2048, 128


class OriginalSplitBatchNorm(nn.BatchNorm2d):
    """The original SplitBatchNorm's state: a BatchNorm2d with a split count.

    Its eval-mode forward is plain batch norm with the running statistics, as in
    BatchNorm2d. These tests run it in eval mode only.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits


class OriginalBackbone(nn.Module):
    """The original ModelBaseMoCo: torchvision ResNet-18 children, in order, in ``net``.

    conv1 becomes a 3x3 stride-1 convolution, the max-pool stays for stl10 and
    tinyimagenet only, and fc becomes Flatten. The width is fixed at 64, as in the original.
    """

    def __init__(self, dataset: str) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18(
            num_classes=PROJ_DIM, norm_layer=partial(OriginalSplitBatchNorm, num_splits=8)
        )
        children = []
        for name, child in resnet.named_children():
            if name == "conv1":
                child = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            elif name == "maxpool" and dataset not in ("stl10", "tinyimagenet"):
                continue
            elif name == "fc":
                child = nn.Flatten(1)
            children.append(child)
        self.net = nn.Sequential(*children)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OriginalHead(nn.Module):
    """The original MoCoHead: Linear ``linear``, ReLU, Linear ``out``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(512, PROJ_HIDDEN)
        self.relu = nn.ReLU(inplace=True)
        self.out = nn.Linear(PROJ_HIDDEN, PROJ_DIM)


class OriginalMemoryBank(nn.Module):
    """The later code's queue (MemoryBankModule), whose only persistent buffer is labels (K,)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("bank", torch.randn(PROJ_DIM, size), persistent=False)
        self.register_buffer("labels", -torch.ones(size, dtype=torch.long))


class EarlierOriginalMSVQ(nn.Module):
    """MSVQ of the network/msvq.py that msvq.py trains: net, encoder_k, encoder_p, three heads, two queues."""

    def __init__(self, dataset: str, queue_size: int) -> None:
        super().__init__()
        self.net = OriginalBackbone(dataset)
        self.encoder_k = OriginalBackbone(dataset)
        self.encoder_p = OriginalBackbone(dataset)
        self.head_q, self.head_k, self.head_p = OriginalHead(), OriginalHead(), OriginalHead()
        self.register_buffer("queue_k", nn.functional.normalize(torch.randn(PROJ_DIM, queue_size), dim=0))
        self.register_buffer("queue_ptr_k", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue_p", nn.functional.normalize(torch.randn(PROJ_DIM, queue_size), dim=0))
        self.register_buffer("queue_ptr_p", torch.zeros(1, dtype=torch.long))


class LaterOriginalMSVQ(nn.Module):
    """MSVQ of the network/msvq.py that main.py trains: net, f_t1, f_t2, g_s, g_t1, g_t2, queue1, queue2."""

    def __init__(self, dataset: str, queue_size: int) -> None:
        super().__init__()
        self.net = OriginalBackbone(dataset)
        self.f_t1 = OriginalBackbone(dataset)
        self.f_t2 = OriginalBackbone(dataset)
        self.g_s = OriginalHead()
        self.g_t1, self.g_t2 = copy.deepcopy(self.g_s), copy.deepcopy(self.g_s)
        self.queue1 = OriginalMemoryBank(queue_size)
        self.queue2 = OriginalMemoryBank(queue_size)


def randomize_batchnorm(module: nn.Module) -> None:
    """Give every batch norm distinct affine parameters and running statistics."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.2, 0.2)
                layer.running_mean.uniform_(-0.2, 0.2)
                layer.running_var.uniform_(0.5, 1.5)
                layer.num_batches_tracked.fill_(7)


def save_original(path: Path, model: nn.Module, epoch: int = 200, **extra) -> None:
    """Save ``model`` as main.py does after its last epoch: model, optimizer and epoch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, **extra}, path)


@pytest.mark.parametrize(
    ("original_class", "dataset", "image_size", "queue_size"),
    [(EarlierOriginalMSVQ, "cifar10", 32, 4096), (LaterOriginalMSVQ, "stl10", 64, 16384)],
    ids=["earlier-code-cifar10", "later-code-stl10-maxpool"],
)
def test_import_matches_original_network(tmp_path, original_class, dataset, image_size, queue_size):
    torch.manual_seed(0)
    original = original_class(dataset, queue_size)
    randomize_batchnorm(original)
    teacher = original.encoder_k if hasattr(original, "encoder_k") else original.f_t1
    assert not torch.equal(teacher.net[0].weight, original.net.net[0].weight)
    src, dst = tmp_path / f"msvq-{dataset}.pth", tmp_path / "imported" / "checkpoint.pt"
    save_original(src, original)

    assert import_original_checkpoint(src, dst, dataset=dataset) == dst

    payload = load_checkpoint(dst)
    backbone = build_backbone(payload).eval()
    student = original.net.eval()
    x = torch.randn(4, 3, image_size, image_size)
    with torch.no_grad():
        expected, actual = student(x), backbone(x)
    assert actual.shape == (4, 512)
    assert expected.abs().max() > 0.01
    assert torch.allclose(actual, expected, rtol=1e-6, atol=1e-6)

    converted = backbone.state_dict()
    for original_key, tensor in student.state_dict().items():
        msvq_key = to_msvq_key("net." + original_key, maxpool=dataset == "stl10")
        assert torch.equal(converted[msvq_key], tensor), original_key
    assert len(converted) == len(student.state_dict())

    assert payload["format"] == FORMAT
    assert payload["arch"] == {"width": 64, "in_channels": 3, "maxpool": dataset == "stl10"}
    assert payload["dataset"] == dataset
    assert payload["method"] == "msvq"
    assert payload["num_classes"] == 10
    assert payload["params"] == {
        "model": {"width": 64, "proj_hidden": PROJ_HIDDEN, "proj_dim": PROJ_DIM},
        "method": {"queue_size": queue_size},
    }
    assert payload["params_hash"] == "imported"
    assert payload["epochs"] == 200
    assert payload["source"] == str(src)


@pytest.mark.parametrize(("dataset", "maxpool"), [("cifar100", False), ("tinyimagenet", True)])
def test_key_mapping_matches_original_structure(dataset, maxpool):
    original = OriginalBackbone(dataset)
    msvq = resnet18(width=64, maxpool=maxpool)
    original_shapes = {"net." + key: value.shape for key, value in original.state_dict().items()}
    msvq_shapes = {key: value.shape for key, value in msvq.state_dict().items()}

    mapped = {to_msvq_key(key, maxpool): shape for key, shape in original_shapes.items()}
    assert mapped == msvq_shapes
    assert {to_original_key(key, maxpool): shape for key, shape in msvq_shapes.items()} == original_shapes
    assert to_msvq_key("net.net.3.0.conv1.weight", maxpool) == (None if maxpool else "layer1.0.conv1.weight")
    assert to_msvq_key("encoder_k.net.0.weight", maxpool) is None


def write_small_checkpoint(path: Path, width: int = 4, in_channels: int = 3, maxpool: bool = False,
                           change=None, **extra) -> nn.Module:
    """Save a narrow network in the original's layout; return msvq's network with the same weights.

    The original's names come from to_original_key, which
    test_key_mapping_matches_original_structure checks against the original structure.
    ``change(model_state)`` edits the state dict before it is saved.
    """
    torch.manual_seed(1)
    network = resnet18(width=width, in_channels=in_channels, maxpool=maxpool)
    randomize_batchnorm(network)
    state = {to_original_key(key, maxpool): value for key, value in network.state_dict().items()}
    teacher = {"encoder_k." + key[len("net."):]: value + 1 for key, value in state.items()}
    model_state = {
        **state,
        **teacher,
        "head_q.linear.weight": torch.randn(32, 8 * width),
        "head_q.out.weight": torch.randn(16, 32),
        "queue_k": torch.randn(16, 64),
        "queue_ptr_k": torch.zeros(1, dtype=torch.long),
    }
    if change is not None:
        change(model_state)
    torch.save({"model": model_state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 50, **extra}, path)
    return network.eval()


def test_import_reads_width_and_channels_from_conv1(tmp_path):
    src, dst = tmp_path / "original.pth", tmp_path / "out" / "checkpoint.pt"
    network = write_small_checkpoint(src, width=4, in_channels=1)

    import_original_checkpoint(src, dst, dataset="fashionmnist")

    payload = load_checkpoint(dst)
    assert payload["arch"] == {"width": 4, "in_channels": 1, "maxpool": False}
    assert payload["num_classes"] == 10
    assert payload["epochs"] == 50
    assert payload["params"] == {"model": {"width": 4, "proj_hidden": 32, "proj_dim": 16}, "method": {"queue_size": 64}}
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(build_backbone(payload).eval()(x), network(x), rtol=1e-6, atol=1e-6)
    assert sorted(path.name for path in dst.parent.iterdir()) == ["checkpoint.pt"]


def test_import_uses_dataset_recorded_in_checkpoint(tmp_path):
    src, dst = tmp_path / "original.pth", tmp_path / "checkpoint.pt"
    write_small_checkpoint(src, maxpool=True, dataset="tinyimagenet")

    import_original_checkpoint(src, dst)

    payload = load_checkpoint(dst)
    assert payload["dataset"] == "tinyimagenet"
    assert payload["num_classes"] == 200
    assert payload["arch"]["maxpool"] is True


def test_dataset_facts_cover_registry():
    assert set(DATASET_FACTS) == set(DATASETS)


def test_pickle_payload_is_rejected_without_running(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    src, dst = tmp_path / "original.pth", tmp_path / "checkpoint.pt"
    write_small_checkpoint(src)
    checkpoint = torch.load(src, weights_only=True)
    torch.save({**checkpoint, "args": Payload()}, src)

    with pytest.raises(CheckpointError) as error:
        import_original_checkpoint(src, dst, dataset="cifar10")

    message = str(error.value)
    assert str(src) in message
    assert "does not unpickle arbitrary Python objects" in message
    assert "posix.system" in message
    assert "torch.save({'model': ckpt['model']" in message
    assert not marker.exists()
    assert not dst.exists()

    # The payload is live: loading the file without weights_only runs it.
    torch.load(src, weights_only=False)
    assert marker.exists()


def delete_key(key):
    return lambda state: state.pop(key)


def add_key(key):
    return lambda state: state.update({key: torch.zeros(3)})


def replace_with(key, tensor):
    return lambda state: state.update({key: tensor})


def keep_teacher_only(state):
    for key in [key for key in state if key.startswith("net.")]:
        del state[key]


FAILURES = {
    "missing-file": (None, {}, "cifar10", "checkpoint not found"),
    "not-a-checkpoint": (b"not a torch file", {}, "cifar10", "not a readable PyTorch checkpoint"),
    "no-model-key": ({"state_dict": {}, "epoch": 3}, {}, "cifar10", "has no 'model' state dict"),
    "msvq-format": ({"format": FORMAT, "model": {}}, {}, "cifar10", "already an msvq backbone checkpoint"),
    "no-student": (None, {"change": keep_teacher_only}, "cifar10", "encoder_k.net.0.weight"),
    "missing-key": (None, {"change": delete_key("net.net.4.0.downsample.1.running_var")}, "cifar10",
                    "missing 1 keys [net.net.4.0.downsample.1.running_var]"),
    "extra-key": (None, {"change": add_key("net.net.3.0.conv3.weight")}, "cifar10",
                  "unexpected 1 keys [net.net.3.0.conv3.weight]"),
    "parameterless-index": (None, {"change": add_key("net.net.2.weight")}, "cifar10",
                            "unexpected 1 keys [net.net.2.weight]"),
    "shape-mismatch": (None, {"change": replace_with("net.net.5.1.bn2.weight", torch.ones(3))}, "cifar10",
                       "net.net.5.1.bn2.weight is (3,), expected (16,)"),
    "conv1-missing": (None, {"change": delete_key("net.net.0.weight")}, "cifar10", "net.net.0.weight (conv1"),
    "no-dataset": (None, {}, None, "pass --dataset"),
    "unknown-dataset": (None, {}, "imagenet", "unknown dataset 'imagenet'"),
    "recorded-dataset-differs": (None, {"dataset": "cifar100"}, "cifar10",
                                 "records dataset 'cifar100', but 'cifar10' was requested"),
    "maxpool-differs": (None, {}, "stl10", "has no max-pool (layer1 at net.net.3)"),
    "channels-differ": (None, {}, "fashionmnist", "conv1 takes 3-channel images but fashionmnist has 1"),
}


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_invalid_checkpoint_raises_naming_file(tmp_path, case):
    content, options, dataset, expected = FAILURES[case]
    src, dst = tmp_path / "original.pth", tmp_path / "out" / "checkpoint.pt"
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif isinstance(content, dict):
        torch.save(content, src)
    elif case != "missing-file":
        write_small_checkpoint(src, **options)
    dst.parent.mkdir()
    dst.write_bytes(b"previous output")

    with pytest.raises(CheckpointError) as error:
        import_original_checkpoint(src, dst, dataset=dataset)

    message = str(error.value)
    assert str(src) in message
    assert expected in message
    assert dst.read_bytes() == b"previous output"
    assert sorted(path.name for path in dst.parent.iterdir()) == ["checkpoint.pt"]


def test_import_rejects_output_over_source(tmp_path):
    src = tmp_path / "original.pth"
    write_small_checkpoint(src)
    before = src.read_bytes()

    with pytest.raises(CheckpointError, match="the output path is the input file"):
        import_original_checkpoint(src, tmp_path / "." / "original.pth", dataset="cifar10")

    assert src.read_bytes() == before
