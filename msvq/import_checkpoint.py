"""Convert a checkpoint of the original MSVQ code into msvq's backbone checkpoint.

The original code (github.com/pc-cp/MSVQ, scripts msvq.py and main.py) saves once, after
its last epoch, ``{"model": MSVQ.state_dict(), "optimizer": SGD.state_dict(), "epoch":
epochs}``. Only the student backbone of ``model`` is kept. The teachers (``encoder_k``
and ``encoder_p``, named ``f_t1`` and ``f_t2`` in the later network/msvq.py), the heads
(``head_q``, ``head_k``, ``head_p``, later ``g_s``, ``g_t1``, ``g_t2``), the queues
(``queue_k``, ``queue_ptr_k``, ``queue_p``, ``queue_ptr_p``, later ``queue1.labels`` and
``queue2.labels``) and the optimizer state are dropped.

Key mapping. The student is ``MSVQ.net``, a ``ModelBaseMoCo`` of network/base_model.py
(the later network/msvq.py imports the same class as ``ModelBase_ResNet18``). Its
constructor walks the children of the ResNet-18 in network/resnet.py, a copy of
torchvision's, in registration order: conv1, bn1, relu, maxpool, layer1 to layer4,
avgpool, fc. It swaps conv1 for a 3x3 stride-1 convolution, keeps maxpool only for
stl10 and tinyimagenet, and replaces fc with Flatten. It stores the result as the
``nn.Sequential`` attribute ``net``, so the student's keys are ``net.net.<index>.<rest>``:

    index   without max-pool   with max-pool
    0       conv1              conv1
    1       bn1                bn1
    2       relu               relu
    3       layer1             maxpool
    4       layer2             layer1
    5       layer3             layer2
    6       layer4             layer3
    7       avgpool            layer4
    8       flatten            avgpool
    9                          flatten

The key ``net.net.<index>.<rest>`` becomes ``<name>.<rest>`` in msvq's ResNet, with the
name from the table. relu, maxpool, avgpool and flatten have no parameters.
Within a stage both networks use torchvision's block names (0.conv1, 0.bn1, 0.conv2,
0.bn2, 0.downsample.0, 0.downsample.1), so <rest> is unchanged. The original's
SplitBatchNorm subclasses BatchNorm2d and stores the same weight, bias, running_mean,
running_var and num_batches_tracked. ``net.net.3.*`` contains parameters only without the
max-pool, so the importer uses them to detect which layout a file has.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from msvq.checkpoint import FORMAT, CheckpointError, build_backbone, save_checkpoint
from msvq.models import resnet18

log = logging.getLogger(__name__)

STUDENT_PREFIX = "net.net."
STAGES = ("layer1", "layer2", "layer3", "layer4")
# The original ModelBaseMoCo keeps the max-pool for these 64 px datasets only.
MAXPOOL_DATASETS = ("stl10", "tinyimagenet")
MAX_KEYS_SHOWN = 8


@dataclass(frozen=True)
class DatasetFacts:
    """Class count and image channels of a dataset in msvq's registry."""

    num_classes: int
    channels: int


DATASET_FACTS = {
    "cifar10": DatasetFacts(num_classes=10, channels=3),
    "cifar100": DatasetFacts(num_classes=100, channels=3),
    "stl10": DatasetFacts(num_classes=10, channels=3),
    "tinyimagenet": DatasetFacts(num_classes=200, channels=3),
    "fashionmnist": DatasetFacts(num_classes=10, channels=1),
}


def first_stage_index(maxpool: bool) -> int:
    """Return the index of layer1 in the original ``net.net`` Sequential."""
    return 4 if maxpool else 3


def to_msvq_key(original_key: str, maxpool: bool) -> str | None:
    """Map an original student key (``net.net.<index>.<rest>``) to msvq's ResNet key.

    Returns None for keys outside the student or at an index that has no parameters.
    """
    if not original_key.startswith(STUDENT_PREFIX):
        return None
    index, _, rest = original_key[len(STUDENT_PREFIX):].partition(".")
    if not index.isdigit() or not rest:
        return None

    index_number = int(index)
    stage = index_number - first_stage_index(maxpool)
    if index_number == 0:
        return f"conv1.{rest}"
    if index_number == 1:
        return f"bn1.{rest}"
    if 0 <= stage < len(STAGES):
        return f"{STAGES[stage]}.{rest}"
    return None


def to_original_key(msvq_key: str, maxpool: bool) -> str:
    """Map msvq's ResNet key to the original student key, the inverse of to_msvq_key."""
    module, _, rest = msvq_key.partition(".")
    if module == "conv1":
        index = 0
    elif module == "bn1":
        index = 1
    elif module in STAGES:
        index = first_stage_index(maxpool) + STAGES.index(module)
    else:
        raise ValueError(f"{msvq_key!r} is not a parameter key of msvq's ResNet")
    return f"{STUDENT_PREFIX}{index}.{rest}"


def import_original_checkpoint(src: str | Path, dst: str | Path, dataset: str | None = None) -> Path:
    """Convert the original code's checkpoint at ``src`` into msvq's format at ``dst``.

    ``dataset`` is required unless the checkpoint has a ``dataset`` entry (the original
    code saves none). The architecture comes from the weights: width and input channels
    from conv1, the max-pool from where layer1 sits. The backbone is rebuilt with strict
    key matching before ``dst`` is written atomically. Raises CheckpointError naming
    ``src`` when the file is missing, unsafe to unpickle, or does not contain a ResNet-18
    student that fits the dataset. Nothing is written to ``dst`` on error.
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise CheckpointError(f"{src}: the output path is the input file; choose another output path")

    payload = load_original(src)
    model_state = payload["model"]
    student = student_state(src, model_state)
    dataset = resolve_dataset(src, dataset, payload.get("dataset"))

    arch = infer_arch(src, student)
    check_arch_fits_dataset(src, arch, dataset)
    backbone_state = map_student(src, student, arch)

    info = {
        "dataset": dataset,
        "method": "msvq",
        "num_classes": DATASET_FACTS[dataset].num_classes,
        "params": infer_params(model_state, arch["width"]),
        "params_hash": "imported",
        "epochs": imported_epochs(payload.get("epoch")),
        "source": str(src),
    }
    try:
        backbone = build_backbone({"format": FORMAT, "arch": arch, "backbone": backbone_state, **info})
    except RuntimeError as error:
        raise CheckpointError(f"{src}: the converted weights do not load into ResNet-18 {arch}: {error}") from error
    save_checkpoint(dst, backbone, arch, info)

    log.info(
        "imported %s into %s: %s ResNet-18 (width %d, %d input channels, max-pool %s), %d tensors kept, "
        "%d keys of teachers, heads and queues dropped",
        src, dst, dataset, arch["width"], arch["in_channels"], arch["maxpool"], len(backbone_state),
        len(model_state) - len(student),
    )
    return dst


def load_original(src: Path) -> dict[str, Any]:
    """Load ``src`` with ``torch.load(weights_only=True)`` and check it has a ``model`` state dict."""
    if not src.is_file():
        raise CheckpointError(f"checkpoint not found: {src}")
    try:
        payload = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = unpickler_detail(error)
        if detail.startswith("Unsupported operand"):
            raise CheckpointError(f"{src} is not a readable PyTorch checkpoint ({detail})") from error
        raise CheckpointError(
            f"{src} was rejected: msvq does not unpickle arbitrary Python objects, which can run code from the "
            f"file, and this file contains some ({detail}). If you trust the file, re-save it as a plain state "
            "dict in a Python session: ckpt = torch.load(SRC, weights_only=False); "
            "torch.save({'model': ckpt['model'], 'epoch': ckpt.get('epoch')}, 'plain.pth'), "
            "then import plain.pth"
        ) from error
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
        raise CheckpointError(f"{src} is not a readable PyTorch checkpoint: {error!r}") from error

    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        raise CheckpointError(f"{src} is already an msvq backbone checkpoint ({FORMAT}); use it as it is")
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        found = sorted(map(str, payload))[:MAX_KEYS_SHOWN] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{src} has no 'model' state dict, so it was not saved by the original MSVQ code "
            f"(which saves {{'model', 'optimizer', 'epoch'}}); found {found}"
        )
    return payload


def unpickler_detail(error: pickle.UnpicklingError) -> str:
    """Return the line of torch's weights-only error that names what was rejected.

    Torch 2.14 wraps it in generic advice: "Unsupported global: GLOBAL ...", "Trying to
    load unsupported GLOBAL ...", "Can only build ..." for objects, "Unsupported operand
    ..." for bytes that are not a pickle at all.
    """
    # NOTE: this reads torch's message text, which may change between versions. A line
    # that is not found only makes the message less specific, and the file is still rejected.
    for line in str(error).splitlines():
        line = line.strip().rstrip(".")
        if line.startswith(("Unsupported", "Trying to", "Can only")):
            return line
    return "torch.load(weights_only=True) failed"


def student_state(src: Path, model_state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return the entries of ``model_state`` under ``net.net.``, the student backbone."""
    student = {key: value for key, value in model_state.items() if key.startswith(STUDENT_PREFIX)}
    if not student:
        raise CheckpointError(
            f"{src}: 'model' has no student backbone keys (expected '{STUDENT_PREFIX}0.weight' and others "
            f"under '{STUDENT_PREFIX}'); its first keys are {shown(sorted(model_state))}"
        )

    not_tensors = [key for key, value in student.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{src}: student entries that are not tensors: {shown(not_tensors)}")
    return student


def resolve_dataset(src: Path, requested: str | None, recorded: Any) -> str:
    """Return the dataset given by the caller or recorded in the checkpoint, checking they agree."""
    recorded = recorded if isinstance(recorded, str) else None
    known = ", ".join(DATASET_FACTS)
    if requested is not None and recorded is not None and requested != recorded:
        raise CheckpointError(f"{src} records dataset {recorded!r}, but {requested!r} was requested")

    dataset = requested if requested is not None else recorded
    if dataset is None:
        raise CheckpointError(
            f"{src} does not record its dataset (the original code saves only model, optimizer and epoch); "
            f"pass --dataset, one of: {known}"
        )
    if dataset not in DATASET_FACTS:
        raise CheckpointError(f"{src}: unknown dataset {dataset!r}; known datasets: {known}")
    return dataset


def infer_arch(src: Path, student: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Return resnet18's arguments: width and input channels from conv1, maxpool from layer1's index."""
    conv1_key = f"{STUDENT_PREFIX}0.weight"
    conv1 = student.get(conv1_key)
    if conv1 is None or conv1.ndim != 4:
        found = "missing" if conv1 is None else f"of shape {tuple(conv1.shape)}"
        raise CheckpointError(
            f"{src}: {conv1_key} (conv1, shape (width, in_channels, 3, 3)) is {found}, "
            "so the architecture cannot be inferred"
        )

    # Index 3 is layer1 without the max-pool and the parameterless max-pool with it.
    layer1_prefix = f"{STUDENT_PREFIX}{first_stage_index(False)}."
    maxpool = not any(key.startswith(layer1_prefix) for key in student)
    return {"width": int(conv1.shape[0]), "in_channels": int(conv1.shape[1]), "maxpool": maxpool}


def check_arch_fits_dataset(src: Path, arch: dict[str, Any], dataset: str) -> None:
    facts = DATASET_FACTS[dataset]
    if arch["in_channels"] != facts.channels:
        raise CheckpointError(
            f"{src}: conv1 takes {arch['in_channels']}-channel images but {dataset} has {facts.channels} "
            "channels; check --dataset"
        )

    expected_maxpool = dataset in MAXPOOL_DATASETS
    if arch["maxpool"] != expected_maxpool:
        found = "has a max-pool (layer1 at net.net.4)" if arch["maxpool"] else "has no max-pool (layer1 at net.net.3)"
        expected = "with" if expected_maxpool else "without"
        raise CheckpointError(
            f"{src}: the backbone {found}, but the original code builds {dataset}'s backbone {expected} "
            "one (it keeps the max-pool for stl10 and tinyimagenet only); check --dataset"
        )


def map_student(src: Path, student: dict[str, torch.Tensor], arch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Rename the student's tensors to msvq's keys; reject missing, extra and misshapen ones."""
    # Only names and shapes are needed, so the reference network skips allocation and initialisation.
    with torch.device("meta"):
        reference = resnet18(**arch).state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, value in student.items():
        target = to_msvq_key(key, arch["maxpool"])
        if target is None or target not in reference:
            unexpected.append(key)
        else:
            mapped[target] = value
    missing = [to_original_key(key, arch["maxpool"]) for key in reference if key not in mapped]
    if missing or unexpected:
        raise CheckpointError(
            f"{src}: the student backbone does not match ResNet-18 {arch}: "
            f"missing {len(missing)} keys {shown(missing)}, unexpected {len(unexpected)} keys {shown(unexpected)}"
        )

    mismatched = [
        f"{to_original_key(key, arch['maxpool'])} is {tuple(value.shape)}, expected {tuple(reference[key].shape)}"
        for key, value in mapped.items()
        if value.shape != reference[key].shape
    ]
    if mismatched:
        raise CheckpointError(
            f"{src}: {len(mismatched)} tensors do not have the shapes of ResNet-18 {arch} "
            f"(width from conv1): {shown(mismatched)}"
        )
    return mapped


def infer_params(model_state: dict[str, Any], width: int) -> dict[str, dict[str, int]]:
    """Return the pretraining parameters readable from the weights: width, head sizes, queue size."""
    model: dict[str, int] = {"width": width}
    params: dict[str, dict[str, int]] = {"model": model}

    # The student head is head_q in the earlier network/msvq.py and g_s in the later one.
    for head in ("head_q", "g_s"):
        hidden = model_state.get(f"{head}.linear.weight")
        out = model_state.get(f"{head}.out.weight")
        if isinstance(hidden, torch.Tensor) and isinstance(out, torch.Tensor) and hidden.ndim == out.ndim == 2:
            model.update(proj_hidden=int(hidden.shape[0]), proj_dim=int(out.shape[0]))

    # Queue 1 is the buffer queue_k (dim, K) in the earlier code and a memory bank whose
    # persistent buffer is labels (K,) in the later code.
    queue_k = model_state.get("queue_k")
    queue1_labels = model_state.get("queue1.labels")
    if isinstance(queue_k, torch.Tensor) and queue_k.ndim == 2:
        params["method"] = {"queue_size": int(queue_k.shape[1])}
    elif isinstance(queue1_labels, torch.Tensor) and queue1_labels.ndim == 1:
        params["method"] = {"queue_size": int(queue1_labels.shape[0])}
    return params


def imported_epochs(epoch: Any) -> int | None:
    """Return the checkpoint's epoch count; the original saves ``epoch + 1`` after its last epoch."""
    if isinstance(epoch, int) and not isinstance(epoch, bool):
        return epoch
    return None


def shown(keys: list[str]) -> str:
    """Format up to MAX_KEYS_SHOWN keys for an error message."""
    listed = ", ".join(keys[:MAX_KEYS_SHOWN])
    more = f" and {len(keys) - MAX_KEYS_SHOWN} more" if len(keys) > MAX_KEYS_SHOWN else ""
    return f"[{listed}{more}]"
