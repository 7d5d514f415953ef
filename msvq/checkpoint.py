"""The final pretraining checkpoint: backbone weights plus what is needed to rebuild it."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from msvq.config import RunParams
from msvq.data.prepared import PreparedDataset
from msvq.io import atomic_path
from msvq.models import resnet18

FORMAT = "msvq-backbone-v1"
RANDOM = "random"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not fit the requested run."""


def backbone_arch(width: int, in_channels: int, image_size: int, crop: int) -> dict[str, Any]:
    """Return the constructor arguments of the backbone for a dataset's images."""
    # The max-pool is kept only for 64 px and larger inputs (STL-10, Tiny ImageNet).
    return {"width": width, "in_channels": in_channels, "maxpool": crop >= 64}


def save_checkpoint(path: Path, backbone: torch.nn.Module, arch: dict[str, Any], info: dict[str, Any]) -> None:
    payload = {
        "format": FORMAT,
        "arch": arch,
        "backbone": {key: value.detach().cpu() for key, value in backbone.state_dict().items()},
        **info,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def unpickler_reason(message: str) -> str:
    """Return the cause from torch's weights-only error, without its advice to load unsafely.

    NOTE: relies on torch 2.14's message layout ("WeightsUnpickler error:" then the
    cause); any other layout gives a generic reason.
    """
    _, marker, rest = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in rest.splitlines() if line.strip()]
    if marker and lines:
        return lines[0]
    return "torch reported an unsupported pickle"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True); reject anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = unpickler_reason(str(error))
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it is not a PyTorch checkpoint, "
            f"or it contains Python objects other than tensors and plain containers, which msvq does not "
            f"unpickle ({reason})"
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path} is not an msvq backbone checkpoint (format {found!r}, expected {FORMAT!r}); "
            "convert checkpoints of the original MSVQ code with `msvq import-checkpoint`"
        )
    return payload


def build_backbone(payload: dict[str, Any], source: str | Path = "checkpoint") -> torch.nn.Module:
    """Rebuild the backbone with plain BatchNorm and load the checkpoint's weights.

    ``source`` names the file in error messages.
    """
    backbone = resnet18(**payload["arch"], bn_splits=1)
    try:
        missing, unexpected = backbone.load_state_dict(payload["backbone"], strict=False)
    except RuntimeError as error:
        mismatches = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        raise CheckpointError(
            f"{source}: weights do not fit ResNet-18 {payload['arch']}: {'; '.join(mismatches[:3]) or error}"
        ) from error
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit ResNet-18 {payload['arch']}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return backbone


def load_backbone(run: RunParams, data: PreparedDataset, checkpoint: str, seed: int = 0) -> torch.nn.Module:
    """Return the frozen backbone of ``checkpoint``, or one initialised from ``seed`` for 'random'.

    Raises CheckpointError naming the file when it was pretrained on another dataset
    or does not fit the dataset's images.
    """
    if checkpoint == RANDOM:
        torch.manual_seed(seed)
        arch = backbone_arch(run.model.width, data.channels, data.image_size, run.data.crop)
        backbone = resnet18(**arch)
    else:
        payload = load_checkpoint(checkpoint)
        if payload.get("dataset") != run.dataset:
            raise CheckpointError(
                f"{checkpoint} was pretrained on {payload.get('dataset')!r}, not on {run.dataset!r}; "
                "pass the checkpoint of this dataset"
            )
        channels = payload["arch"].get("in_channels")
        if channels != data.channels:
            raise CheckpointError(
                f"{checkpoint} expects {channels}-channel images but {run.dataset} has {data.channels}"
            )
        backbone = build_backbone(payload, source=checkpoint)
    backbone.eval()
    backbone.requires_grad_(False)
    return backbone
