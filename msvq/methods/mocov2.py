"""MoCo v2: InfoNCE against a queue of keys from a momentum encoder, symmetric in the two views."""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from msvq.methods.base import Method
from msvq.methods.common import FeatureQueue, ema_update_, make_teacher
from msvq.methods.losses import infonce_loss


class MoCoV2(Method):
    """MoCo v2 on two strong views, each a query of the student and a key of the momentum encoder.

    loss = (InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2 against the queue as it was before the
    batch. Then the keys of both views, k1 and k2, are enqueued (2B rows per step).
    """

    view_kinds = ("strong", "strong")

    def __init__(
        self,
        backbone_fn: Callable[[], nn.Module],
        *,
        proj_hidden: int,
        proj_dim: int,
        momentum: float,
        temperature: float,
        queue_size: int,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__(backbone_fn, proj_hidden=proj_hidden, proj_dim=proj_dim, shuffle_bn=shuffle_bn)
        self.momentum = momentum
        self.temperature = temperature
        self.key_encoder = make_teacher(self.student)
        self.queue = FeatureQueue(queue_size, proj_dim)

    def training_step(self, views: list[Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Update the key encoder, compute the loss of views [x1, x2], enqueue the keys and return the loss.

        Across processes the queue receives every rank's keys in rank order.
        """
        self._check_views(views)
        x1, x2 = views

        ema_update_(self.key_encoder, self.student, self.momentum)

        # The queue is cloned because the enqueue below overwrites rows that backward needs.
        queue = self.queue.features.clone()
        q1, q2 = self._encode_student([x1, x2])
        k1 = self._encode_teacher(self.key_encoder, x1, generator)
        k2 = self._encode_teacher(self.key_encoder, x2, generator)

        loss = (infonce_loss(q1, k2, queue, self.temperature) + infonce_loss(q2, k1, queue, self.temperature)) / 2

        self.queue.enqueue_(torch.cat([self._gather_keys(k1), self._gather_keys(k2)]))
        return loss
