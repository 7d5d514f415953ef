"""Backbone features of a test-split subsample, embedded in 2-D with scikit-learn's t-SNE."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.manifold import TSNE

from msvq.checkpoint import build_backbone, load_checkpoint
from msvq.data.prepared import PreparedDataset
from msvq.knn import extract_features
from msvq.report.results import ReportError

log = logging.getLogger(__name__)

# Images per forward pass. The backbone runs in eval mode, so this changes speed and
# memory only, never the features.
FEATURE_BATCH_SIZE = 512


def subsample(count: int, max_points: int, seed: int) -> np.ndarray:
    """Return sorted indices of at most ``max_points`` of ``count`` items, drawn without replacement."""
    if max_points < 1:
        raise ValueError(f"max_points must be at least 1, got {max_points}")
    if count <= max_points:
        return np.arange(count)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(count, size=max_points, replace=False))


def checkpoint_features(
    checkpoint_path: Path,
    dataset: str,
    method: str,
    data: PreparedDataset,
    indices: np.ndarray,
    device: torch.device,
) -> np.ndarray:
    """Return the L2-normalised backbone features (len(indices), D) of those test images.

    The images are resized to the crop size the checkpoint was trained with. Raises
    ReportError when the checkpoint belongs to another dataset or method.
    """
    payload = load_checkpoint(checkpoint_path)
    if payload.get("dataset") != dataset or payload.get("method") != method:
        raise ReportError(
            f"{checkpoint_path} was trained with dataset {payload.get('dataset')!r}, method "
            f"{payload.get('method')!r}, but is stored as the run of {dataset!r}, {method!r}; rerun that pretraining"
        )
    try:
        crop = int(payload["params"]["data"]["crop"])
    except (KeyError, TypeError, ValueError) as error:
        raise ReportError(f"{checkpoint_path} has no valid params.data.crop ({error!r})") from error

    backbone = build_backbone(payload).to(device)
    images = data.images("test")[indices]
    features = extract_features(backbone, images, data.mean, data.std, crop, FEATURE_BATCH_SIZE, device)
    return features.cpu().numpy()


def tsne_embedding(features: np.ndarray, seed: int, perplexity: float) -> np.ndarray:
    """Embed features (N, D) in 2-D with Barnes-Hut t-SNE, PCA initialisation and a fixed seed."""
    count = len(features)
    if count < 2:
        raise ValueError(f"t-SNE needs at least 2 points, got {count}")
    if perplexity >= count:
        # scikit-learn requires perplexity < n_samples.
        reduced = (count - 1) / 3
        log.warning("perplexity %.1f must be below the number of points (%d); using %.1f", perplexity, count, reduced)
        perplexity = reduced
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed)
    return tsne.fit_transform(features.astype(np.float32, copy=False))
