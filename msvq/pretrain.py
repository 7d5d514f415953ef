"""The pretraining loop shared by every method.

Outputs in OUT (the declared outputs of the pipeline stage):
    checkpoint.pt   student backbone weights, architecture, resolved params and their hash
    knn.csv         epoch, knn_top1
    train_log.csv   epoch, loss, lr, knn_top1, images_per_s, seconds
    metrics.json    final kNN top-1, epochs, wall time, throughput

Resume state lives in STATE_DIR/last.pt (by default OUT/resume/), which the
pipeline never declares as an output, so Snakemake and DVC leave it alone when
they clear outputs before a rerun. It is written atomically after every epoch and
contains the student, teachers, queues and pointers, the optimizer, the step, every
RNG state and the params hash. A rerun uses it only when that hash matches.
"""

from __future__ import annotations

import csv
import io
import logging
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from msvq import augment
from msvq.checkpoint import backbone_arch, load_backbone, save_checkpoint
from msvq.config import ParamsError, RunParams
from msvq.data.prepared import PreparedDataset, open_prepared
from msvq.device import select_device, select_precision
from msvq.distributed import (
    SINGLE_PROCESS,
    Ranks,
    average_,
    broadcast_object,
    check_divisible,
    max_over_ranks,
    process_group,
    rank_rows,
)
from msvq.io import atomic_path, write_json, write_text
from msvq.knn import extract_features_across_ranks, knn_top1
from msvq.methods import build_method
from msvq.models import resnet18
from msvq.schedule import warmup_cosine
from msvq.workflow import source_digest

log = logging.getLogger(__name__)

PRETRAIN_SECTIONS = ("data", "model", "pretrain", "method")
VIEW_RECIPES = {"strong": augment.STRONG, "weak": augment.WEAK}
STATE_VERSION = 1


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped."""


@dataclass
class History:
    rows: list[dict[str, Any]] = field(default_factory=list)

    def knn_csv(self) -> str:
        return self._csv(["epoch", "knn_top1"])

    def log_csv(self) -> str:
        return self._csv(["epoch", "loss", "lr", "knn_top1", "images_per_s", "seconds"])

    def _csv(self, columns: list[str]) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({key: ("" if row.get(key) is None else row[key]) for key in columns})
        return buffer.getvalue()


def make_views(batch: torch.Tensor, view_kinds, crop: int, mean, std, generator: torch.Generator,
               memory_format: torch.memory_format, rows: torch.Tensor | None = None,
               total: int | None = None) -> list[torch.Tensor]:
    """Make one augmented view of a uint8 batch per entry of ``view_kinds``, in ``memory_format``.

    With ``rows``, ``batch`` contains those rows of a global batch of ``total`` images: the
    random parameters are drawn for the whole global batch and applied to these rows, so
    an image gets the same view whatever the number of processes.
    """
    views = []
    for kind in view_kinds:
        view = augment.random_view(batch, VIEW_RECIPES[kind], crop, mean, std, generator, rows=rows, total=total)
        views.append(view.contiguous(memory_format=memory_format))
    return views


def optimization_step(method, optimizer, views: list[torch.Tensor], dtype: torch.dtype | None,
                      generator: torch.Generator) -> torch.Tensor:
    """Run the method's step on ``views`` (under bf16 autocast when ``dtype`` is set), backward and SGD.

    Returns the loss tensor without reading it, so the step never waits for the device.
    """
    device_type = views[0].device.type
    with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = method.training_step(views, generator=generator)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    method.average_batchnorm_statistics_()
    return loss


def epoch_generator(seed: int, epoch: int, purpose: int, device: torch.device) -> torch.Generator:
    """Return a generator seeded from (seed, epoch, purpose), so a resumed epoch replays exactly."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + epoch * 101 + purpose)
    return generator


def pretraining_images(data: PreparedDataset, subset: int | None, seed: int) -> np.ndarray:
    """Return the uint8 images pretraining draws from (STL-10 adds its unlabeled split)."""
    # Copied into memory once, so every epoch indexes RAM instead of the memory map.
    images = np.array(data.images("train"))
    if data.has_split("unlabeled"):
        images = np.concatenate([images, data.images("unlabeled")])
    if subset is not None:
        if subset > len(images):
            raise ParamsError(
                f"data.train_subset = {subset} exceeds the {len(images)} train images of {data.meta['dataset']}; "
                "lower it or set it to null"
            )
        order = np.random.default_rng(seed).permutation(len(images))[:subset]
        images = images[np.sort(order)]
    return images


def build_backbone_factory(run: RunParams, data: PreparedDataset, ranks: Ranks = SINGLE_PROCESS):
    """Return a function that builds the pretraining backbone, and its architecture settings.

    Each of W processes gets 1/W of the global batch, so its backbone gets
    model.bn_splits / W splits of the same size as in a single process.
    """
    arch = backbone_arch(run.model.width, data.channels, data.image_size, run.data.crop)

    def factory():
        return resnet18(**arch, bn_splits=run.model.bn_splits // ranks.world_size)

    return factory, arch


def run_knn(backbone, data: PreparedDataset, run: RunParams, device, dtype, ranks: Ranks = SINGLE_PROCESS) -> float:
    """kNN top-1 (percent) of the test split against the labelled train split.

    Across processes each rank encodes its share of the images, and every rank scores
    the gathered features.
    """
    bank_labels = torch.from_numpy(data.labels("train"))
    batch = max(512, run.pretrain.batch_size)
    kwargs = dict(mean=data.mean, std=data.std, crop=run.data.crop, batch_size=batch, device=device,
                  autocast_dtype=dtype)
    bank = extract_features_across_ranks(backbone, data.images("train"), ranks, **kwargs)
    test = extract_features_across_ranks(backbone, data.images("test"), ranks, **kwargs)
    test_labels = torch.from_numpy(data.labels("test"))
    return float(knn_top1(test, bank, bank_labels, test_labels, data.num_classes, k=run.pretrain.knn_k,
                          t=run.pretrain.knn_t))


def knn_of_checkpoint(run: RunParams, checkpoint: str, seed: int = 0) -> float:
    """kNN top-1 of a pretrained backbone, or of a fresh one when ``checkpoint`` is 'random'."""
    data = open_prepared(run.data.root, run.dataset)
    device = select_device(run.pretrain.device)
    dtype = select_precision(run.pretrain.precision, device)
    memory_format = torch.channels_last if run.pretrain.channels_last else torch.contiguous_format
    backbone = load_backbone(run, data, checkpoint, seed=seed).to(device=device, memory_format=memory_format)
    return run_knn(backbone, data, run, device, dtype)


def rng_states() -> dict[str, Any]:
    # Each epoch draws from generators seeded by (seed, epoch); the global states
    # are kept as well for any library code that uses them.
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path: Path, method, optimizer, epoch: int, step: int, params_hash: str, history: History,
               code_hash: str) -> None:
    state = {
        "version": STATE_VERSION,
        "params_hash": params_hash,
        "code_hash": code_hash,
        "epoch": epoch,
        "step": step,
        "method": method.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": rng_states(),
        "history": history.rows,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, params_hash: str, code_hash: str) -> dict[str, Any] | None:
    """Return the resume state at ``path`` if it was made with the same params and code, else None.

    ``code_hash`` covers the msvq source files pretraining imports, so a workflow that
    reruns pretraining after a code change trains afresh instead of resuming a run
    that older code finished.
    """
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        log.warning("ignoring unreadable resume state %s (%s); starting fresh", path, error)
        return None
    if state.get("version") != STATE_VERSION or state.get("params_hash") != params_hash:
        log.warning(
            "ignoring resume state %s: it was made with other parameters (hash %s, now %s); starting fresh",
            path, str(state.get("params_hash"))[:12], params_hash[:12],
        )
        return None
    if state.get("code_hash") != code_hash:
        log.warning("ignoring resume state %s: it was made with other msvq source code; starting fresh", path)
        return None
    return state


def pretrain(run: RunParams, out: str | Path, state_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Pretrain ``run.method_name`` on ``run.dataset`` and write the outputs to ``out``.

    Started by torchrun, this process trains as one rank of the group, and only rank 0
    writes files. Returns the metrics on rank 0 and None on the other ranks.
    """
    out = Path(out)
    state_path = Path(state_dir or out / "resume") / "last.pt"
    with process_group(run.pretrain.device) as (ranks, device):
        return train(run, out, state_path, ranks, device)


def check_world_size(run: RunParams, ranks: Ranks) -> None:
    """Raise ParamsError unless the global batch and the BatchNorm splits divide among the processes."""
    check_divisible("pretrain.batch_size", run.pretrain.batch_size, ranks)
    # Every process normalises whole SplitBatchNorm groups of batch_size / bn_splits
    # samples, so the groups, and the results, do not depend on the number of processes.
    check_divisible("model.bn_splits", run.model.bn_splits, ranks)


def train(run: RunParams, out: Path, state_path: Path, ranks: Ranks, device: torch.device) -> dict[str, Any] | None:
    """Run the pretraining loop as one of ``ranks`` on ``device``; see ``pretrain``."""
    params_hash = run.digest(*PRETRAIN_SECTIONS)
    cfg, method_cfg = run.pretrain, run.method
    check_world_size(run, ranks)
    dtype = select_precision(cfg.precision, device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format

    # --- data -------------------------------------------------------------------
    data = open_prepared(run.data.root, run.dataset)
    images = torch.from_numpy(pretraining_images(data, run.data.train_subset, cfg.seed))
    if device.type == "cuda":
        images = images.pin_memory()
    steps_per_epoch = len(images) // cfg.batch_size
    if steps_per_epoch == 0:
        raise ParamsError(
            f"pretrain.batch_size = {cfg.batch_size} exceeds the {len(images)} pretraining images of {run.dataset}"
        )
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = steps_per_epoch * cfg.warmup_epochs
    # This rank's rows of every global batch (all of them in a single process), as
    # indices into the batch's order on the host and into its views on the device.
    rows = rank_rows(cfg.batch_size, ranks) if ranks.enabled else None
    view_rows = None if rows is None else rows.to(device)

    # --- model ------------------------------------------------------------------
    torch.manual_seed(cfg.seed)
    factory, arch = build_backbone_factory(run, data, ranks)
    method = build_method(
        run.method_name, factory, proj_hidden=run.model.proj_hidden, proj_dim=run.model.proj_dim,
        m1=method_cfg.m1, m2=method_cfg.m2, tau_s=method_cfg.tau_s, tau_t=method_cfg.tau_t,
        queue_size=method_cfg.queue_size, shuffle_bn=cfg.shuffle_bn,
    ).to(device=device, memory_format=memory_format)
    optimizer = torch.optim.SGD(
        method.trainable_parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )

    # --- resume -----------------------------------------------------------------
    history, start_epoch, step = History(), 0, 0
    code_hash = source_digest("pretrain")
    # Rank 0 reads the state and sends it to the other ranks.
    state = load_state(state_path, params_hash, code_hash) if ranks.is_main else None
    state = broadcast_object(state, ranks)
    if state is not None:
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_states(state["rng"])
        start_epoch, step, history.rows = state["epoch"], state["step"], list(state["history"])
        log.info("resuming from %s after epoch %d of %d", state_path, start_epoch, cfg.epochs)
    if cfg.compile:
        method.compile_networks()
    method.distribute(ranks, device)
    setup = ["bf16 autocast" if dtype else "fp32"]
    if cfg.compile:
        setup.append("compiled")
    if ranks.enabled:
        setup.append(f"{ranks.world_size} processes of {cfg.batch_size // ranks.world_size} images per step")
    log.info(
        "pretraining %s on %s: %d images, %d steps/epoch, %d epochs, device %s, %s",
        run.method_name, run.dataset, len(images), steps_per_epoch, cfg.epochs, device, ", ".join(setup),
    )

    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        epoch_start = time.perf_counter()
        method.train()
        # Every rank draws the same order, views and shuffles from these generators.
        order = torch.randperm(len(images), generator=epoch_generator(cfg.seed, epoch, 0, torch.device("cpu")))
        view_generator = epoch_generator(cfg.seed, epoch, 1, device)
        shuffle_generator = epoch_generator(cfg.seed, epoch, 2, device)
        loss_sum = torch.zeros((), device=device)
        first_bad_step = torch.full((), -1, device=device, dtype=torch.long)

        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, unit="step",
                   disable=not ranks.is_main)
        for i in bar:
            lr = warmup_cosine(step, total_steps, warmup_steps, cfg.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            batch = images[index if rows is None else index[rows]].to(device, non_blocking=True)
            views = make_views(batch, method.view_kinds, run.data.crop, data.mean, data.std, view_generator,
                               memory_format, rows=view_rows, total=cfg.batch_size)
            loss = optimization_step(method, optimizer, views, dtype, shuffle_generator)

            loss = loss.detach().float()
            finite = torch.isfinite(loss)
            first_bad_step = torch.where((first_bad_step < 0) & ~finite, torch.tensor(step, device=device),
                                         first_bad_step)
            loss_sum += torch.where(finite, loss, torch.zeros_like(loss))
            step += 1
            if i % 20 == 0 or i == steps_per_epoch - 1:
                bad = int(max_over_ranks(first_bad_step, ranks))
                if bad >= 0:
                    raise NonFiniteLossError(
                        f"non-finite loss at epoch {epoch + 1}, step {bad + 1} (global); stopping. "
                        f"The last good resume state is {state_path} (after epoch {epoch}). "
                        "Lower pretrain.lr or use precision fp32."
                    )
                shown_loss = loss_sum.clone()
                average_([shown_loss], ranks)
                bar.set_postfix(loss=f"{shown_loss.item() / (i + 1):.4f}", lr=f"{lr:.4g}")
        bar.close()
        average_([loss_sum], ranks)

        train_seconds = time.perf_counter() - epoch_start
        knn = None
        last = epoch + 1 == cfg.epochs
        if cfg.knn_every and ((epoch + 1) % cfg.knn_every == 0 or last):
            knn = run_knn(method.student_backbone, data, run, device, dtype, ranks)
        row = {
            "epoch": epoch + 1,
            "loss": round(loss_sum.item() / steps_per_epoch, 6),
            "lr": round(lr, 8),
            "knn_top1": None if knn is None else round(knn, 3),
            "images_per_s": round(steps_per_epoch * cfg.batch_size / train_seconds, 1),
            "seconds": round(time.perf_counter() - epoch_start, 2),
            # Kept in the resume state, not in train_log.csv.
            "processes": ranks.world_size,
        }
        history.rows.append(row)
        log.info(
            "epoch %d/%d  loss %.4f  lr %.4g  knn top-1 %s  %.1f img/s  %.1fs",
            row["epoch"], cfg.epochs, row["loss"], lr, "-" if knn is None else f"{knn:.2f}",
            row["images_per_s"], row["seconds"],
        )
        if ranks.is_main:
            save_state(state_path, method, optimizer, epoch + 1, step, params_hash, history, code_hash)
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / "train_log.csv", history.log_csv())

    if not ranks.is_main:
        return None
    return write_outputs(out, run, method, arch, data, history, params_hash, device, dtype,
                         time.perf_counter() - started)


def write_outputs(out, run, method, arch, data, history, params_hash, device, dtype, seconds) -> dict[str, Any]:
    knn_rows = [row for row in history.rows if row["knn_top1"] is not None]
    metrics = {
        "knn_top1": knn_rows[-1]["knn_top1"] if knn_rows else None,
        "epochs": run.pretrain.epochs,
        "final_loss": history.rows[-1]["loss"] if history.rows else None,
        "images_per_s": history.rows[-1]["images_per_s"] if history.rows else None,
        "wall_time_s": round(sum(row["seconds"] for row in history.rows), 1),
        "this_run_s": round(seconds, 1),
        "device": device.type,
        # The process count of the run that trained the last epoch, which a resumed
        # finished run (training nothing) does not change.
        "processes": history.rows[-1].get("processes", 1) if history.rows else None,
        "precision": "bf16" if dtype else "fp32",
        "params_hash": params_hash,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(
        out / "checkpoint.pt", method.student_backbone, arch,
        {
            "dataset": run.dataset,
            "method": run.method_name,
            "num_classes": data.num_classes,
            "params": run.sections(*PRETRAIN_SECTIONS),
            "params_hash": params_hash,
            "epochs": run.pretrain.epochs,
        },
    )
    write_text(out / "knn.csv", history.knn_csv())
    write_text(out / "train_log.csv", history.log_csv())
    write_json(out / "metrics.json", metrics)
    log.info("wrote %s (final kNN top-1 %s)", out, metrics["knn_top1"])
    return metrics
