"""Split batch normalisation: one set of batch statistics per chunk of the batch."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training mode, normalises each of `num_splits` equal chunks
    of the batch with that chunk's own statistics.

    Chunk s contains samples s*n to (s+1)*n - 1, with n = batch // num_splits. The running
    mean and variance move towards the mean over chunks of the chunk statistics (the
    variance unbiased, as in nn.BatchNorm2d). In eval mode it is plain BatchNorm2d, and
    its state-dict keys are those of nn.BatchNorm2d, so weights move between the two.

    Each chunk is a view of the batch in either memory format (the batch dimension is
    outermost in both), so the layer accepts channels_last and contiguous tensors and
    runs the native batch-norm kernel once per chunk.
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be at least 1, got {num_splits}")
        self.num_splits = num_splits

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)

        batch = x.shape[0]
        if batch % self.num_splits != 0:
            raise ValueError(
                f"SplitBatchNorm2d: batch size {batch} is not divisible by num_splits "
                f"{self.num_splits}, use a batch size that is a multiple of {self.num_splits}"
            )

        # Each chunk's batch statistics come back through per-chunk buffers updated with
        # momentum 1.0, which makes them exactly that chunk's mean and unbiased variance.
        track = self.track_running_stats
        chunk_means, chunk_vars, outputs = [], [], []
        for chunk in x.chunk(self.num_splits):
            mean = torch.zeros_like(self.running_mean) if track else None
            var = torch.ones_like(self.running_var) if track else None
            outputs.append(F.batch_norm(chunk, mean, var, self.weight, self.bias, True, 1.0, self.eps))
            chunk_means.append(mean)
            chunk_vars.append(var)

        if track:
            self._update_running_stats(torch.stack(chunk_means), torch.stack(chunk_vars))
        return torch.cat(outputs)

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, unbiased_vars: Tensor) -> None:
        """Move the running statistics towards the chunk statistics averaged over chunks.

        means and unbiased_vars are (S, C): each chunk's mean and unbiased variance.
        """
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        self.running_mean.lerp_(means.mean(dim=0), factor)
        self.running_var.lerp_(unbiased_vars.mean(dim=0), factor)


def uses_only_split_batchnorm(module: nn.Module) -> bool:
    """Return True when every batch-norm layer in ``module`` is a SplitBatchNorm2d."""
    norms = [layer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    return all(isinstance(layer, SplitBatchNorm2d) for layer in norms)


@contextmanager
def split_count_scaled(module: nn.Module, factor: int) -> Iterator[None]:
    """Multiply the split count of every SplitBatchNorm2d in ``module`` by ``factor`` for a block.

    A batch of ``factor`` views concatenated along the batch dimension then gets the same
    chunk size, and so the same per-chunk statistics, as each view alone.
    """
    layers = [layer for layer in module.modules() if isinstance(layer, SplitBatchNorm2d)]
    for layer in layers:
        layer.num_splits *= factor
    try:
        yield
    finally:
        for layer in layers:
            layer.num_splits //= factor
