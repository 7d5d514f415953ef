"""Linear evaluation: a frozen backbone and one trained Linear layer.

Protocol (linear section of the params file): the backbone is rebuilt with plain
BatchNorm, loaded, frozen and kept in eval mode. The classifier is one Linear layer
(weights N(0, 0.01), zero bias) trained with SGD and a per-step cosine schedule.

Modes:
- ``augmented`` (paper protocol): each training batch is a fresh RandomResizedCrop
  (scale 0.08-1) and flip view, encoded by the frozen backbone.
- ``features``: the training images are encoded once without augmentation and the
  classifier is trained on those features; much faster on a CPU.
In both modes the test images are normalised only, so their features are computed once.

Outputs in OUT: ``metrics.json`` (last-epoch top-1 and top-5, which are the reported
result, plus the best top-1 and its epoch) and ``curve.csv`` (one row per epoch).
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from msvq import augment
from msvq.checkpoint import load_backbone
from msvq.config import RunParams
from msvq.data.prepared import PreparedDataset, open_prepared
from msvq.device import select_precision
from msvq.distributed import Ranks, check_divisible, gather_rows, process_group, rank_rows
from msvq.io import write_json, write_text
from msvq.knn import extract_features_across_ranks
from msvq.models import LinearClassifier
from msvq.schedule import warmup_cosine

log = logging.getLogger(__name__)

CURVE_COLUMNS = ["epoch", "loss", "lr", "top1", "top5"]


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    hits = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * hits.float().mean().item()


def curve_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CURVE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def train_classifier(
    train_batches,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    feature_dim: int,
    num_classes: int,
    run: RunParams,
    steps_per_epoch: int,
    desc: str = "linear",
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train a LinearClassifier and evaluate it on the test features after every epoch.

    ``train_batches(epoch)`` yields (features (B, D), labels (B,)) for one epoch.
    Returns one row per epoch with loss, lr, top1 and top5 (percent).
    """
    cfg = run.linear
    torch.manual_seed(cfg.seed)
    device = test_features.device
    classifier = LinearClassifier(feature_dim, num_classes).to(device)
    optimizer = torch.optim.SGD(
        classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )
    total_steps = cfg.epochs * steps_per_epoch
    rows, step = [], 0

    for epoch in range(cfg.epochs):
        classifier.train()
        loss_sum = torch.zeros((), device=device)
        bar = tqdm(train_batches(epoch), total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{cfg.epochs}",
                   leave=False, unit="step", disable=not progress)
        for features, labels in bar:
            lr = warmup_cosine(step, total_steps, 0, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(classifier(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1

        classifier.eval()
        with torch.no_grad():
            logits = classifier(test_features)
        row = {
            "epoch": epoch + 1,
            "loss": round(loss_sum.item() / steps_per_epoch, 6),
            "lr": round(lr, 8),
            "top1": round(topk_accuracy(logits, test_labels, 1), 3),
            "top5": round(topk_accuracy(logits, test_labels, 5), 3),
        }
        if not np.isfinite(row["loss"]):
            raise FloatingPointError(f"linear evaluation loss became non-finite at epoch {epoch + 1}; lower linear.lr")
        rows.append(row)
        log.info("linear epoch %d/%d  loss %.4f  top-1 %.2f  top-5 %.2f", epoch + 1, cfg.epochs, row["loss"],
                 row["top1"], row["top5"])
    return rows


def linear_eval(run: RunParams, checkpoint: str, out: str | Path, mode: str | None = None) -> dict[str, Any] | None:
    """Evaluate ``checkpoint`` (or 'random') on ``run.dataset`` and write the outputs to ``out``.

    Started by torchrun, each process encodes its share of every batch, and all ranks
    train the same classifier on the gathered features. Only rank 0 writes files.
    Returns the metrics on rank 0 and None on the other ranks.
    """
    with process_group(run.pretrain.device) as (ranks, device):
        return evaluate(run, checkpoint, Path(out), mode or run.linear.mode, ranks, device)


def check_world_size(run: RunParams, ranks: Ranks) -> None:
    """Raise ParamsError unless the global batch divides among the processes."""
    check_divisible("linear.batch_size", run.linear.batch_size, ranks)


def evaluate(run: RunParams, checkpoint: str, out: Path, mode: str, ranks: Ranks,
             device: torch.device) -> dict[str, Any] | None:
    """Run linear evaluation as one of ``ranks`` on ``device``; see ``linear_eval``."""
    started = time.perf_counter()
    check_world_size(run, ranks)
    dtype = select_precision(run.pretrain.precision, device)
    data = open_prepared(run.data.root, run.dataset)
    backbone = load_backbone(run, data, checkpoint, seed=run.linear.seed).to(device)
    crop, batch_size = run.data.crop, run.linear.batch_size
    encode = dict(mean=data.mean, std=data.std, crop=crop, batch_size=max(512, batch_size), device=device,
                  autocast_dtype=dtype, normalize=False)

    log.info("encoding the %d test images", len(data.images("test")))
    test_features = extract_features_across_ranks(backbone, data.images("test"), ranks, **encode)
    test_labels = torch.from_numpy(data.labels("test")).to(device)
    train_images = data.images("train")
    train_labels = torch.from_numpy(data.labels("train"))
    steps_per_epoch = -(-len(train_images) // batch_size)

    if mode == "features":
        log.info("encoding the %d train images once (mode features)", len(train_images))
        train_features = extract_features_across_ranks(backbone, train_images, ranks, **encode)
        labels_on_device = train_labels.to(device)

        def train_batches(epoch: int):
            generator = torch.Generator().manual_seed(run.linear.seed * 1000 + epoch)
            order = torch.randperm(len(train_features), generator=generator).to(device)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                yield train_features[index], labels_on_device[index]

    elif mode == "augmented":
        images = torch.from_numpy(np.array(train_images))

        def train_batches(epoch: int):
            generator = torch.Generator().manual_seed(run.linear.seed * 1000 + epoch)
            view_generator = torch.Generator(device=device).manual_seed(run.linear.seed * 1000 + epoch + 1)
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                # Each rank encodes its rows of the batch, and every rank gets all features.
                rows = rank_rows(len(index), ranks) if ranks.enabled else None
                batch = images[index if rows is None else index[rows]].to(device, non_blocking=True)
                views = augment.random_view(batch, augment.LINEAR_TRAIN, crop, data.mean, data.std,
                                            generator=view_generator, rows=rows, total=len(index))
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                     enabled=dtype is not None):
                    features = backbone(views).float()
                yield gather_rows(features, len(index), ranks), train_labels[index].to(device)

    else:
        raise ValueError(f"unknown linear evaluation mode {mode!r}; expected 'augmented' or 'features'")

    rows = train_classifier(train_batches, test_features, test_labels, test_features.shape[1], data.num_classes,
                            run, steps_per_epoch, desc=f"linear {run.dataset}/{run.method_name}",
                            progress=ranks.is_main)

    best = max(rows, key=lambda row: row["top1"])
    metrics = {
        "top1": rows[-1]["top1"],
        "top5": rows[-1]["top5"],
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "epochs": run.linear.epochs,
        "mode": mode,
        "checkpoint": str(checkpoint),
        "dataset": run.dataset,
        "method": run.method_name,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "processes": ranks.world_size,
    }
    if not ranks.is_main:
        return None
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "curve.csv", curve_csv(rows))
    write_json(out / "metrics.json", metrics)
    log.info("linear top-1 %.2f (best %.2f at epoch %d); wrote %s", metrics["top1"], metrics["best_top1"],
             metrics["best_epoch"], out)
    return metrics
