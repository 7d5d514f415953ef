"""Shared machinery of the methods: the student, teacher forward passes, trainable parameters."""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from msvq.distributed import SINGLE_PROCESS, Ranks, average_, gather_rows, rank_rows
from msvq.methods.common import Encoder
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
        self.ranks = SINGLE_PROCESS

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

    def compile_networks(self) -> None:
        """Compile the forward pass of the student and of every teacher with torch.compile.

        Each network compiles in place (nn.Module.compile), so state_dict() keys do not
        change. Compiling happens at the first forward pass of each input shape.
        """
        for module in self.children():
            if isinstance(module, Encoder):
                module.compile()

    def distribute(self, ranks: Ranks, device: torch.device) -> None:
        """Train as one of ``ranks.world_size`` processes, after the method is on ``device`` with its state loaded.

        The student runs under DistributedDataParallel, which averages its gradients over
        ranks. Its BatchNorm buffers are not broadcast before each forward pass. Instead,
        ``average_batchnorm_statistics_`` averages them after each step, so every rank
        keeps the running statistics that one process computes from the global batch.
        """
        self.ranks = ranks
        if ranks.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            # Kept out of the module tree, so state_dict() keys stay those of one process.
            self.__dict__["_student_ddp"] = DistributedDataParallel(
                MultiViewEncoder(self.student), device_ids=device_ids, forward_sync_buffers=False
            )
            buffers = []
            for layer in self.modules():
                if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats:
                    buffers += [layer.running_mean, layer.running_var]
            self.__dict__["_batchnorm_buffers"] = buffers

    def _encode_student(self, views: Sequence[Tensor]) -> list[Tensor]:
        """Encode each view with the student; one DistributedDataParallel call covers all of them."""
        ddp = self.__dict__.get("_student_ddp")
        if ddp is None:
            return [self.student(x) for x in views]
        return list(ddp(*views))

    def _gather_keys(self, keys: Tensor) -> Tensor:
        """Return the keys (B, D) of the global batch, every rank's rows in rank order."""
        return gather_rows(keys, keys.shape[0] * self.ranks.world_size, self.ranks)

    @torch.no_grad()
    def average_batchnorm_statistics_(self) -> None:
        """Average the BatchNorm running means and variances of every network over ranks.

        Each rank's running statistics moved towards the mean of its own chunks this
        step. The update is linear in that mean, and every rank has the same number of
        chunks, so the average over ranks equals the update one process makes with all
        chunks of the global batch. A no-op in a single process.
        """
        if self.ranks.enabled:
            average_(self.__dict__["_batchnorm_buffers"], self.ranks)

    @torch.no_grad()
    def _encode_teacher(self, teacher: nn.Module, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Encode x (B, ...) with the teacher into features (B, D), shuffling the batch when shuffle_bn."""
        return self._encode_teacher_views(teacher, [x], generator)[0]

    @torch.no_grad()
    def _encode_teacher_views(self, teacher: nn.Module, views: Sequence[Tensor],
                              generator: torch.Generator | None) -> list[Tensor]:
        """Encode equal-sized views with one teacher in a single forward pass.

        With shuffle_bn, each view's global batch is permuted before the forward pass and
        restored after it, so each sample lands in a random BatchNorm split, and the
        teacher's batch statistics differ from the ones the student uses for that
        sample. Across processes the permutation spans the global batch: every rank
        gathers all ranks' views, encodes its own rows of the permuted batch, and
        gathers the features back. Every rank draws the same permutation from
        ``generator``, which must be seeded alike on all ranks. One permutation is drawn
        per view, in view order.

        Each SplitBatchNorm2d runs with its split count times the number of views. Every
        view then keeps splits of its own, of the size it gets when encoded alone, so the
        features match one call per view up to floating-point rounding. The teacher's
        running statistics get one update instead of one per view, which no output
        depends on, because teachers always use batch statistics. A teacher with plain
        BatchNorm2d layers (bn_splits 1) encodes the views one by one, since a joint pass
        would mix their batch statistics.
        """
        if len(views) > 1 and not uses_only_split_batchnorm(teacher):
            return [self._encode_teacher_views(teacher, [x], generator)[0] for x in views]
        batch = views[0].shape[0]
        if any(x.shape[0] != batch for x in views):
            raise ValueError(f"views must have equal batch sizes, got {[x.shape[0] for x in views]}")
        total = batch * self.ranks.world_size
        # Made on the device: copying indices from the host would wait for the GPU.
        own_rows = rank_rows(total, self.ranks, views[0].device)

        unshuffles = []
        if self.shuffle_bn:
            shuffled = []
            for x in views:
                permutation = torch.randperm(total, generator=generator, device=x.device)
                unshuffles.append(torch.argsort(permutation))
                x_global = gather_rows(x, total, self.ranks)
                shuffled.append(x_global[permutation[own_rows]].contiguous(memory_format=memory_format_of(x)))
            views = shuffled

        if len(views) == 1:
            features = [teacher(views[0])]
        else:
            with split_count_scaled(teacher, len(views)):
                features = teacher(torch.cat(list(views))).split(batch)
        if not self.shuffle_bn:
            return list(features)
        return [gather_rows(z, total, self.ranks)[unshuffle[own_rows]] for z, unshuffle in zip(features, unshuffles)]


def memory_format_of(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class MultiViewEncoder(nn.Module):
    """Applies one encoder to each of several views in a single forward call."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, *views: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.encoder(x) for x in views)
