"""Run a few pretraining steps of a tiny method and save every rank's state after each step.

tests/test_distributed.py runs this file as one process and under
``torchrun --nproc-per-node 2`` and compares the saved files. Each step goes through
the pieces the pretraining loop uses: this rank's rows of the global batch, views drawn
for the global batch, ``optimization_step`` and the DistributedDataParallel student.

    python tests/distributed_steps.py --method msvq --shuffle-bn --out DIR

writes DIR/rank{R}_step{S}.pt with the global loss of step S and the method's state_dict.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from msvq.distributed import average_, process_group, rank_rows  # noqa: E402
from msvq.methods import build_method  # noqa: E402
from msvq.models import resnet18  # noqa: E402
from msvq.pretrain import make_views, optimization_step  # noqa: E402

GLOBAL_BATCH = 16
BN_SPLITS = 4
IMAGE_SIZE = 16
MEAN, STD = (0.5,), (0.25,)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="msvq")
    parser.add_argument("--shuffle-bn", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with process_group("cpu") as (ranks, device):
        torch.manual_seed(0)
        # Every process keeps SplitBatchNorm chunks of GLOBAL_BATCH / BN_SPLITS samples.
        local_splits = BN_SPLITS // ranks.world_size
        method = build_method(
            args.method, lambda: resnet18(width=4, in_channels=1, bn_splits=local_splits),
            proj_hidden=32, proj_dim=16, m1=0.9, m2=0.7, tau_s=0.1, tau_t=0.04, queue_size=64,
            shuffle_bn=args.shuffle_bn,
        )
        method.distribute(ranks, device)
        optimizer = torch.optim.SGD(method.trainable_parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

        images = torch.randint(0, 256, (args.steps * GLOBAL_BATCH, IMAGE_SIZE, IMAGE_SIZE, 1), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(3))
        rows = rank_rows(GLOBAL_BATCH, ranks) if ranks.enabled else None
        view_generator = torch.Generator().manual_seed(1)
        shuffle_generator = torch.Generator().manual_seed(2)
        args.out.mkdir(parents=True, exist_ok=True)

        for step in range(args.steps):
            batch = images[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH]
            if rows is not None:
                batch = batch[rows]
            views = make_views(batch, method.view_kinds, IMAGE_SIZE, MEAN, STD, view_generator,
                               torch.contiguous_format, rows=rows, total=GLOBAL_BATCH)
            loss = optimization_step(method, optimizer, views, None, shuffle_generator).detach()
            average_([loss], ranks)
            torch.save({"loss": loss.item(), "state": method.state_dict()},
                       args.out / f"rank{ranks.rank}_step{step}.pt")


if __name__ == "__main__":
    main()
