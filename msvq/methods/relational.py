"""Relational distillation against queues: MSVQ and its ablations MSV, MQ and ReSSL.

Views: the student encodes the strong view x1, teacher 1 (momentum m1) the weak views x2
and x3, and teacher 2 (momentum m2) the weak view x4. queue1 stores teacher 1's features
of x2, and queue2 stores teacher 2's features of x4. With s1 = z1 queue1^T / tau_s, s2 = z1 queue2^T / tau_s and the teacher targets
p_a, p_b (z2, z3 against queue1) and p_c (z4 against queue2) at temperature tau_t:

    ressl: CE(p_a, s1)
    msv:   (CE(p_a, s1) + CE(p_b, s1)) / 2
    mq:    (CE(p_a, s1) + CE(p_c, s2)) / 2
    msvq:  (CE(p_a, s1) + CE(p_b, s1) + CE(p_c, s2)) / 3
"""

from collections.abc import Callable

import torch
from torch import Tensor, nn

from msvq.methods.base import Method
from msvq.methods.common import FeatureQueue, ema_update_, make_teacher
from msvq.methods.losses import relational_loss


class RelationalDistillation(Method):
    """The family, configured by the class attributes of its subclasses.

    teacher1_views: the number of weak views teacher 1 encodes (1: x2, 2: x2 and x3).
    use_teacher2: whether teacher 2 (momentum m2) encodes x4 against queue2. m2 is unused
    when it is False.
    """

    teacher1_views: int = 1
    use_teacher2: bool = False
    view_kinds = ("strong", "weak")

    def __init__(
        self,
        backbone_fn: Callable[[], nn.Module],
        *,
        proj_hidden: int,
        proj_dim: int,
        m1: float,
        m2: float,
        tau_s: float,
        tau_t: float,
        queue_size: int,
        shuffle_bn: bool = True,
    ) -> None:
        super().__init__(backbone_fn, proj_hidden=proj_hidden, proj_dim=proj_dim, shuffle_bn=shuffle_bn)
        self.m1 = m1
        self.m2 = m2
        self.tau_s = tau_s
        self.tau_t = tau_t

        self.teacher1 = make_teacher(self.student)
        self.queue1 = FeatureQueue(queue_size, proj_dim)
        if self.use_teacher2:
            self.teacher2 = make_teacher(self.student)
            self.queue2 = FeatureQueue(queue_size, proj_dim)

    def training_step(self, views: list[Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Update the teachers, compute the loss of one batch of views, enqueue and return the loss.

        The views are [x1, x2] for ressl, [x1, x2, x3] for msv, [x1, x2, x4] for mq and
        [x1, x2, x3, x4] for msvq.

        Across processes each rank passes its rows of the global batch, and the queues
        receive every rank's keys in rank order, so all ranks keep the same queues.
        """
        self._check_views(views)

        ema_update_(self.teacher1, self.student, self.m1)
        if self.use_teacher2:
            ema_update_(self.teacher2, self.student, self.m2)

        # The queues are cloned because the enqueue below overwrites rows that backward needs.
        queue1 = self.queue1.features.clone()
        z1 = self._encode_student(views[:1])[0]
        # Teacher 1 encodes x2 (and x3 for msv and msvq) in one forward pass.
        teacher1_feats = self._encode_teacher_views(self.teacher1, views[1 : 1 + self.teacher1_views], generator)
        z2 = teacher1_feats[0]
        teacher_feats, queues = list(teacher1_feats), [queue1] * self.teacher1_views
        if self.use_teacher2:
            queue2 = self.queue2.features.clone()
            z4 = self._encode_teacher(self.teacher2, views[-1], generator)
            teacher_feats.append(z4)
            queues.append(queue2)

        loss = relational_loss(z1, teacher_feats, queues, self.tau_s, self.tau_t)

        self.queue1.enqueue_(self._gather_keys(z2))
        if self.use_teacher2:
            self.queue2.enqueue_(self._gather_keys(z4))
        return loss


class ReSSL(RelationalDistillation):
    """ReSSL: teacher 1 on x2 against queue1."""

    teacher1_views = 1
    use_teacher2 = False
    view_kinds = ("strong", "weak")


class MSV(RelationalDistillation):
    """Multiple sample views: teacher 1 on x2 and x3, both against queue1."""

    teacher1_views = 2
    use_teacher2 = False
    view_kinds = ("strong", "weak", "weak")


class MQ(RelationalDistillation):
    """Multiple queues: teacher 1 on x2 against queue1, teacher 2 on x4 against queue2."""

    teacher1_views = 1
    use_teacher2 = True
    view_kinds = ("strong", "weak", "weak")


class MSVQ(RelationalDistillation):
    """MSVQ: teacher 1 on x2 and x3 against queue1, teacher 2 on x4 against queue2."""

    teacher1_views = 2
    use_teacher2 = True
    view_kinds = ("strong", "weak", "weak", "weak")
