"""Weighted k-nearest-neighbour classification on L2-normalised features (the kNN monitor)."""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from msvq.augment import test_view
from msvq.distributed import Ranks, gather_rows, rank_rows


def knn_predict(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk_size: int = 1024,
) -> Tensor:
    """Score each class (N, num_classes) by a vote of each query's k most similar bank rows.

    features (N, D) and bank (M, D) are L2-normalised, so their dot product is the cosine
    similarity. bank_labels is (M,) int64. Neighbour j of query i votes for its label with
    weight exp(sim_ij / t). k is clipped to M. Queries are processed chunk_size at a time,
    so the similarity matrix never exceeds chunk_size x M.
    """
    if bank.shape[0] == 0:
        raise ValueError("the kNN bank is empty")
    k = min(k, bank.shape[0])

    scores = []
    for chunk in features.split(chunk_size):
        similarity = chunk @ bank.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = torch.exp(top_similarity / t)
        votes = torch.zeros(chunk.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores.append(votes.scatter_add_(1, bank_labels[top_index], weights))
    return torch.cat(scores)


def knn_top1(
    features: Tensor,
    bank: Tensor,
    bank_labels: Tensor,
    labels: Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
) -> float:
    """Return the top-1 accuracy in percent of knn_predict on queries with true labels (N,)."""
    scores = knn_predict(features, bank, bank_labels, num_classes, k=k, t=t)
    correct = (scores.argmax(dim=1) == labels.to(scores.device)).sum()
    return 100.0 * correct.item() / labels.shape[0]


def extract_features(
    backbone: nn.Module,
    images: np.ndarray | Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    crop: int,
    batch_size: int,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    normalize: bool = True,
) -> Tensor:
    """Compute L2-normalised float32 features (N, D), on `device`, of uint8 images (N, H, W, C).

    With normalize=False it returns the raw backbone features (linear evaluation uses them).

    Each batch goes through augment.test_view and the backbone in eval mode under
    torch.no_grad (and autocast when autocast_dtype is set). The backbone's previous
    train/eval mode is restored afterwards.
    """
    if len(images) == 0:
        raise ValueError("extract_features got no images")
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()

    features = []
    with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for start in range(0, len(images), batch_size):
            batch = _as_tensor(images[start : start + batch_size]).to(device, non_blocking=True)
            output = backbone(test_view(batch, crop, mean, std))
            output = output.float()
            features.append(F.normalize(output, dim=1) if normalize else output)

    backbone.train(was_training)
    return torch.cat(features)


def _as_tensor(images: np.ndarray | Tensor) -> Tensor:
    if isinstance(images, Tensor):
        return images
    # np.array copies a (possibly read-only, memory-mapped) slice into writable memory.
    return torch.from_numpy(np.array(images))


def extract_features_across_ranks(backbone: nn.Module, images: np.ndarray | Tensor, ranks: Ranks,
                                  **kwargs) -> Tensor:
    """Run extract_features on this rank's share of ``images`` and return every rank's features, in order.

    The keyword arguments are those of extract_features. In a single process this is
    extract_features on all images.
    """
    if not ranks.enabled:
        return extract_features(backbone, images, **kwargs)
    rows = rank_rows(len(images), ranks).numpy()
    return gather_rows(extract_features(backbone, images[rows], **kwargs), len(images), ranks)
