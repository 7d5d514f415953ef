"""Loss functions of the methods, as pure functions of feature tensors.

Feature conventions: the rows of z (B, D) are L2-normalised, and a queue (K, D) contains
L2-normalised keys from earlier batches. Similarities are computed in at least float32,
also inside an autocast region, because a bfloat16 cosine of 0.9 is only accurate to
about 0.002, which a teacher temperature of 0.04 magnifies to 0.05 in the logits.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def distill_ce(z_teacher: Tensor, z_student: Tensor, queue: Tensor, tau_t: float, tau_s: float) -> Tensor:
    """Compute the relational distillation term CE(p, s), averaged over the batch.

    p = softmax(z_teacher queue^T / tau_t) is the teacher's similarity distribution over
    the queue, a target with no gradient. s = z_student queue^T / tau_s are the student's
    logits, and CE(p, s) = -sum_k p_k log_softmax(s)_k. z_teacher and z_student are
    (B, D) and queue is (K, D). Returns a scalar.
    """
    p = F.softmax(_similarity(z_teacher.detach(), queue) / tau_t, dim=1)
    log_q = F.log_softmax(_similarity(z_student, queue) / tau_s, dim=1)
    return -(p * log_q).sum(dim=1).mean()


def relational_loss(
    z1: Tensor, teacher_feats: list[Tensor], queues: list[Tensor], tau_s: float, tau_t: float
) -> Tensor:
    """Average distill_ce over (teacher features, queue) pairs, all against student features z1.

    z1 and every teacher_feats[i] are (B, D), and queues[i] is the (K_i, D) queue of term i.
    ReSSL is one pair, and MSVQ is [z2, z3, z4] with [queue1, queue1, queue2].
    """
    if not teacher_feats:
        raise ValueError("relational_loss needs at least one (teacher features, queue) pair")
    terms = [distill_ce(z_t, z1, queue, tau_t, tau_s) for z_t, queue in zip(teacher_feats, queues, strict=True)]
    return torch.stack(terms).mean()


def msvq_loss(
    z1: Tensor, z2: Tensor, z3: Tensor, z4: Tensor, queue1: Tensor, queue2: Tensor, tau_s: float, tau_t: float
) -> Tensor:
    """Compute the MSVQ loss (CE(p_a, s1) + CE(p_b, s1) + CE(p_c, s2)) / 3.

    z1 are the student's features of the strong view x1, z2 and z3 teacher 1's features of
    the weak views x2 and x3, and z4 teacher 2's features of x4, all (B, D). queue1 (K, D)
    contains teacher 1's features of x2 and queue2 (K, D) teacher 2's features of x4.
    """
    return relational_loss(z1, [z2, z3, z4], [queue1, queue1, queue2], tau_s, tau_t)


def infonce_loss(q: Tensor, k: Tensor, queue: Tensor, tau: float) -> Tensor:
    """Compute InfoNCE with one positive key per query and the queue as negatives, averaged over the batch.

    q (B, D) are the queries and k (B, D) their positive keys, which get no gradient. queue
    (K, D) contains the negative keys. Row i's logits are [q_i . k_i, q_i queue^T] / tau,
    and its loss is the cross-entropy with class 0.
    """
    q, k = _at_least_float32(q), _at_least_float32(k.detach())
    positive = (q * k).sum(dim=1, keepdim=True)
    negatives = _similarity(q, queue)
    logits = torch.cat([positive, negatives], dim=1) / tau
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, targets)


def _at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _similarity(z: Tensor, queue: Tensor) -> Tensor:
    """Compute z queue^T (B, K) in at least float32, with autocast disabled."""
    with torch.autocast(z.device.type, enabled=False):
        return _at_least_float32(z) @ _at_least_float32(queue).T
