"""Building blocks shared by the methods: encoder, EMA update, feature queue."""

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Encoder(nn.Module):
    """Backbone followed by a projection head, whose forward returns L2-normalised features (B, D)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone(x)), dim=1)


def make_teacher(student: nn.Module) -> nn.Module:
    """Copy the student into a teacher whose parameters take no gradient."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """Set teacher = momentum * teacher + (1 - momentum) * student, for parameters only.

    Buffers (BatchNorm running statistics) are left as they are. The update is one fused
    multi-tensor lerp over all parameters.
    """
    teacher_params = list(teacher.parameters())
    student_params = list(student.parameters())
    if len(teacher_params) != len(student_params):
        raise ValueError(
            f"teacher has {len(teacher_params)} parameter tensors and student {len(student_params)}, "
            "but the teacher must be a copy of the student"
        )
    torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)


class FeatureQueue(nn.Module):
    """First-in first-out queue of K feature rows, with its write pointer, both persistent buffers.

    Rows start as random L2-normalised vectors. `features` is (K, D), and `ptr` is a 0-d
    int64 tensor with the row where the next enqueue starts.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and feature dim must be positive, got size {size} and dim {dim}")
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.features.shape[0]

    @torch.no_grad()
    def enqueue_(self, keys: Tensor) -> None:
        """Write keys (N, D) over the oldest N rows, wrapping around the end of the queue.

        The pointer stays on the device, so this does not synchronise with the host.
        """
        num_keys = keys.shape[0]
        if num_keys > self.size:
            raise ValueError(f"cannot enqueue {num_keys} keys into a queue of {self.size} rows, use a queue of at least {num_keys}")
        rows = torch.remainder(self.ptr + torch.arange(num_keys, device=self.ptr.device), self.size)
        self.features.index_copy_(0, rows, keys.to(self.features.dtype))
        self.ptr.copy_(torch.remainder(self.ptr + num_keys, self.size))

