import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msvq import augment
from msvq.knn import extract_features, knn_predict, knn_top1
from msvq.models import resnet18


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _unit(angle_degrees):
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


# A bank of unit vectors in the plane: class 0 near 0 degrees, class 1 near 90, class 2 at 180.
BANK = torch.tensor([_unit(a) for a in (0, 10, -10, 80, 90, 100, 180)])
BANK_LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2])


def test_knn_votes_for_nearest_class():
    query = torch.tensor([_unit(85)])

    scores = knn_predict(query, BANK, BANK_LABELS, num_classes=3, k=3, t=0.1)

    # The three nearest rows are at 80, 90 and 100 degrees, all class 1.
    expected_class1 = sum(math.exp(math.cos(math.radians(d)) / 0.1) for d in (5, 5, 15))
    assert scores.shape == (1, 3)
    assert scores[0, 1].item() == pytest.approx(expected_class1, rel=1e-5)
    assert scores[0, 0].item() == 0.0
    assert scores[0, 2].item() == 0.0


def test_knn_weights_outvote_a_majority():
    # Neighbours at 5 degrees (class 0) and at 40 and 50 degrees (class 1): with t = 0.1
    # the single close neighbour weighs more than the two far ones together.
    bank = torch.tensor([_unit(5), _unit(40), _unit(50)])
    bank_labels = torch.tensor([0, 1, 1])
    query = torch.tensor([_unit(0)])

    scores = knn_predict(query, bank, bank_labels, num_classes=2, k=3, t=0.1)

    assert scores.argmax(dim=1).item() == 0
    expected = [math.exp(math.cos(math.radians(5)) / 0.1), sum(math.exp(math.cos(math.radians(d)) / 0.1) for d in (40, 50))]
    torch.testing.assert_close(scores[0], torch.tensor(expected), rtol=1e-5, atol=0)


def test_knn_clips_k_to_bank_size():
    queries = torch.tensor([_unit(85), _unit(175)])

    clipped = knn_predict(queries, BANK, BANK_LABELS, num_classes=3, k=200, t=0.1)
    exact = knn_predict(queries, BANK, BANK_LABELS, num_classes=3, k=len(BANK), t=0.1)

    torch.testing.assert_close(clipped, exact)
    assert (clipped > 0).all()


def test_knn_chunks_give_same_scores():
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(37, 8, generator=generator), dim=1)
    bank = F.normalize(torch.randn(50, 8, generator=generator), dim=1)
    bank_labels = torch.randint(0, 4, (50,), generator=generator)

    whole = knn_predict(features, bank, bank_labels, num_classes=4, k=10)
    chunked = knn_predict(features, bank, bank_labels, num_classes=4, k=10, chunk_size=5)

    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=0)


def test_knn_top1_in_percent():
    queries = torch.tensor([_unit(85), _unit(5), _unit(175), _unit(95)])
    labels = torch.tensor([1, 0, 2, 0])

    accuracy = knn_top1(queries, BANK, BANK_LABELS, labels, num_classes=3, k=1)

    assert accuracy == pytest.approx(75.0)


def test_knn_rejects_empty_bank():
    with pytest.raises(ValueError, match="empty"):
        knn_predict(torch.tensor([_unit(0)]), torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), num_classes=2)


def test_extract_features_batch_independent():
    torch.manual_seed(0)
    backbone = resnet18(width=4, bn_splits=2).train()
    images = np.random.default_rng(0).integers(0, 256, size=(10, 12, 12, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    in_batches_of_3 = extract_features(backbone, images, mean, std, crop=12, batch_size=3, device="cpu")
    at_once = extract_features(backbone, torch.from_numpy(images), mean, std, crop=12, batch_size=10, device="cpu")

    assert in_batches_of_3.shape == (10, 32)
    assert in_batches_of_3.dtype == torch.float32
    torch.testing.assert_close(in_batches_of_3.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(in_batches_of_3, at_once, atol=1e-5, rtol=1e-5)
    assert backbone.training

    backbone.eval()
    with torch.no_grad():
        expected = F.normalize(backbone(augment.test_view(torch.from_numpy(images), 12, mean, std)), dim=1)
    torch.testing.assert_close(at_once, expected, atol=1e-5, rtol=1e-5)


def test_extract_features_under_bfloat16_autocast():
    torch.manual_seed(0)
    backbone = resnet18(width=4, in_channels=1)
    images = torch.randint(0, 256, (4, 8, 8, 1), dtype=torch.uint8)

    reduced = extract_features(
        backbone, images, (0.5,), (0.25,), crop=8, batch_size=2, device="cpu", autocast_dtype=torch.bfloat16
    )
    full = extract_features(backbone, images, (0.5,), (0.25,), crop=8, batch_size=2, device="cpu")

    assert reduced.dtype == torch.float32
    torch.testing.assert_close(reduced.norm(dim=1), torch.ones(4))
    # bfloat16 keeps 8 significant bits, so the cosine to the float32 features stays near 1.
    assert (reduced * full).sum(dim=1).min() > 0.99
