"""Shared machinery of the methods: the student, teacher forward passes, trainable parameters."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from msvq.methods.common import Encoder, shuffle_batch
from msvq.models import ProjectionHead
from msvq.models.batchnorm import split_count_scaled, uses_only_split_batchnorm


class Method(nn.Module):
    """Base class of the self-supervised methods.

    A subclass sets `view_kinds` (the augmentation, "strong" or "weak", of each view that
    training_step expects, in order) and implements training_step. The student is
    backbone_fn() followed by a ProjectionHead. Everything a subclass registers (teachers,
    queues) is part of state_dict().
    """

    view_kinds: tuple[str, ...] = ()

    def __init__(
        self, backbone_fn: Callable[[], nn.Module], *, proj_hidden: int, proj_dim: int, shuffle_bn: bool = True
    ) -> None:
        super().__init__()
        backbone = backbone_fn()
        self.student = Encoder(backbone, ProjectionHead(backbone.feature_dim, proj_hidden, proj_dim))
        self.shuffle_bn = shuffle_bn

    @property
    def student_backbone(self) -> nn.Module:
        return self.student.backbone

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Return the parameters the optimizer updates: the student's, never a teacher's."""
        return list(self.student.parameters())

    def training_step(self, views: list[Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Update the teachers, compute the loss of one batch of views, enqueue, and return the loss."""
        raise NotImplementedError

    def _check_views(self, views: Sequence[Tensor]) -> None:
        if len(views) != len(self.view_kinds):
            raise ValueError(
                f"{type(self).__name__} expects {len(self.view_kinds)} views {self.view_kinds}, got {len(views)}"
            )

    @torch.no_grad()
    def _encode_teacher(self, teacher: nn.Module, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Encode x (B, ...) with the teacher into features (B, D), shuffling the batch when shuffle_bn.

        Shuffling places each sample in a random BatchNorm split, so the teacher's batch
        statistics differ from the ones the student uses for the same sample.
        """
        if not self.shuffle_bn:
            return teacher(x)
        shuffled, unshuffle = shuffle_batch(x, generator)
        return teacher(shuffled)[unshuffle]

    @torch.no_grad()
    def _encode_teacher_views(self, teacher: nn.Module, views: Sequence[Tensor],
                              generator: torch.Generator | None) -> list[Tensor]:
        """Encode equal-sized views with one teacher in a single forward pass.

        Each SplitBatchNorm2d runs with its split count times the number of views. Every
        view then keeps splits of its own, of the size it gets when encoded alone, so the
        features match separate _encode_teacher calls up to floating-point rounding.
        Shuffling draws one permutation per view, in view order, as separate calls do. The
        teacher's running statistics get one update instead of one per view, which no
        output depends on, because teachers always use batch statistics. A teacher with
        plain BatchNorm2d layers (bn_splits 1) encodes the views one by one, since a joint
        pass would mix their batch statistics.
        """
        if len(views) == 1 or not uses_only_split_batchnorm(teacher):
            return [self._encode_teacher(teacher, x, generator) for x in views]
        batch = views[0].shape[0]
        if any(x.shape[0] != batch for x in views):
            raise ValueError(f"views must have equal batch sizes, got {[x.shape[0] for x in views]}")

        unshuffles = []
        if self.shuffle_bn:
            shuffled = []
            for x in views:
                x, unshuffle = shuffle_batch(x, generator)
                shuffled.append(x)
                unshuffles.append(unshuffle)
            views = shuffled
        with split_count_scaled(teacher, len(views)):
            features = teacher(torch.cat(list(views))).split(batch)
        if not self.shuffle_bn:
            return list(features)
        return [z[unshuffle] for z, unshuffle in zip(features, unshuffles)]
