"""The `msvq` command: one subcommand per pipeline stage.

Each subcommand parses and validates its arguments, then calls a library
function with plain arguments. Known failures (bad parameters, missing or
corrupt files, failed downloads) print one clear message and exit with status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from msvq.config import ParamsError, load_params

log = logging.getLogger("msvq")


def data_settings(args: argparse.Namespace) -> tuple[Path, list[str]]:
    """Return the data root and extra mirrors from --params, then --root/--mirror."""
    root, mirrors = Path("data"), []
    if args.params:
        params = load_params(args.params)
        section = params.raw["data"]
        root = Path(section["root"])
        mirrors = list(section["mirrors"])
    if args.root:
        root = Path(args.root)
    return root, [*args.mirror, *mirrors]


def cmd_download(args: argparse.Namespace) -> None:
    from msvq.data import download, get_spec

    root, mirrors = data_settings(args)
    download(get_spec(args.dataset), root, mirrors, timeout=(args.timeout, args.timeout * 6), retries=args.retries)


def cmd_prepare(args: argparse.Namespace) -> None:
    from msvq.data import get_spec, prepare

    root, _ = data_settings(args)
    prepare(get_spec(args.dataset), root, force=args.force)


class WorkersStopped(Exception):
    """The processes started under torchrun stopped: ``code`` is the command's exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def start_processes_if_needed(nproc: int, args: argparse.Namespace, run, check_inputs) -> bool:
    """Run this command as ``nproc`` processes under torchrun and wait; return False if it is not needed.

    It is not needed for one process, or when the command already runs under a torchrun
    that the user started (several nodes, for example), whose process count then
    applies instead of ``nproc``. ``check_inputs()`` raises on missing input files
    before any process starts (loading the params already checked that the batch sizes
    divide by ``nproc``). Raises WorkersStopped when the processes fail or a signal
    stops them.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from msvq.distributed import launched_by_torchrun, run_torchrun

    if nproc == 1 or launched_by_torchrun():
        return False
    check_inputs()
    try:
        run_torchrun(nproc, args.argv, run.pretrain.device)
    except SignalException as stop:
        raise WorkersStopped(128 + int(stop.sigval), f"stopped by {stop.sigval.name}") from None
    except ChildFailedError as error:
        codes = sorted({failure.exitcode for failure in error.failures.values()})
        raise WorkersStopped(
            1, f"{len(error.failures)} of {nproc} processes failed (exit status {codes}); their errors are above"
        ) from None
    return True


def cmd_pretrain(args: argparse.Namespace) -> None:
    from msvq.data.prepared import open_prepared
    from msvq.pretrain import pretrain

    run = load_params(args.params).run(args.dataset, args.method)
    if args.device:
        run = dataclasses.replace(run, pretrain=dataclasses.replace(run.pretrain, device=args.device))

    def check_inputs():
        open_prepared(run.data.root, run.dataset)

    if not start_processes_if_needed(run.pretrain.nproc, args, run, check_inputs):
        pretrain(run, args.out, state_dir=args.state_dir)


def cmd_linear_eval(args: argparse.Namespace) -> None:
    from msvq.data.prepared import open_prepared
    from msvq.linear import linear_eval

    run = load_params(args.params).run(args.dataset, args.method)
    if args.device:
        run = dataclasses.replace(run, pretrain=dataclasses.replace(run.pretrain, device=args.device))

    def check_inputs():
        open_prepared(run.data.root, run.dataset)
        if args.checkpoint != "random" and not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}; run msvq pretrain first")

    if not start_processes_if_needed(run.linear.nproc, args, run, check_inputs):
        linear_eval(run, args.checkpoint, args.out, mode=args.mode)


def cmd_report(args: argparse.Namespace) -> None:
    from msvq.report import make_report

    make_report(args.params, args.results, out_dir=args.out, paper_path=args.paper, tsne_points=args.tsne_points,
                device=args.device)


def cmd_import_checkpoint(args: argparse.Namespace) -> None:
    from msvq.import_checkpoint import import_original_checkpoint

    import_original_checkpoint(args.src, args.dst, dataset=args.dataset)


def cmd_knn(args: argparse.Namespace) -> None:
    from msvq.pretrain import knn_of_checkpoint

    run = load_params(args.params).run(args.dataset, args.method)
    top1 = knn_of_checkpoint(run, args.checkpoint, seed=args.seed)
    print(f"{args.dataset} {args.checkpoint}: kNN top-1 {top1:.2f}")


def cmd_check_params(args: argparse.Namespace) -> None:
    from msvq.io import write_text
    from msvq.workflow import check_tracked_keys

    params = load_params(args.params)
    check_tracked_keys(params.raw, args.params)
    log.info("%s is valid: %d dataset(s) x %d method(s)", args.params, len(params.datasets), len(params.methods))
    if args.stamp:
        # Constant content, so a rerun after a valid change leaves dependent stages alone.
        write_text(args.stamp, "parameters valid\n")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    from msvq.data import DATASETS

    parser.add_argument("dataset", choices=sorted(DATASETS), help="dataset name")
    parser.add_argument("--params", help="params file whose data.root (and, for download, data.mirrors) is used")
    parser.add_argument("--root", help="data directory holding raw/ and prepared/ (default: data, or data.root)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msvq", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    download = commands.add_parser("download", help="fetch and verify a dataset's raw files")
    add_data_options(download)
    download.add_argument("--mirror", action="append", default=[], metavar="DIR",
                          help="local directory searched for the raw files before any URL (repeatable)")
    download.add_argument("--timeout", type=float, default=10.0,
                          help="HTTP connect timeout in seconds; the read timeout is 6 times this")
    download.add_argument("--retries", type=int, default=3, help="attempts per URL")
    download.set_defaults(func=cmd_download)

    prepare = commands.add_parser("prepare", help="convert raw files into uint8 arrays and meta.json")
    add_data_options(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even if up to date")
    prepare.set_defaults(func=cmd_prepare, mirror=[])

    pretrain = commands.add_parser("pretrain", help="pretrain one method on one dataset")
    pretrain.add_argument("--dataset", required=True, help="dataset name from the params file")
    pretrain.add_argument("--method", required=True, help="method name from the params file")
    pretrain.add_argument("--params", required=True, help="params file, e.g. config/params.yaml")
    pretrain.add_argument("--out", required=True,
                          help="output directory (checkpoint.pt, knn.csv, train_log.csv, metrics.json, resume/)")
    pretrain.add_argument("--state-dir", help="directory of the resume state last.pt (default: OUT/resume)")
    pretrain.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override pretrain.device")
    pretrain.set_defaults(func=cmd_pretrain)

    linear = commands.add_parser("linear-eval", help="train a linear classifier on a frozen backbone")
    linear.add_argument("--dataset", required=True, help="dataset name from the params file")
    linear.add_argument("--method", required=True, help="method name (labels the outputs and picks overrides)")
    linear.add_argument("--checkpoint", required=True, help="checkpoint.pt from msvq pretrain, or 'random'")
    linear.add_argument("--params", required=True, help="params file, e.g. config/params.yaml")
    linear.add_argument("--out", required=True, help="output directory (metrics.json, curve.csv)")
    linear.add_argument("--mode", choices=["augmented", "features"], help="override linear.mode")
    linear.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override pretrain.device")
    linear.set_defaults(func=cmd_linear_eval)

    report = commands.add_parser("report", help="draw the kNN and t-SNE figures and the results table")
    report.add_argument("--params", required=True, help="params file, e.g. config/params.yaml")
    report.add_argument("--results", default="results", help="results directory (default: results)")
    report.add_argument("--out", help="where figures/ and table.* go (default: the results directory)")
    report.add_argument("--paper", default="config/paper_results.yaml",
                        help="YAML file of the paper's reported numbers (default: config/paper_results.yaml)")
    report.add_argument("--tsne-points", type=int,
                        help="max test points per t-SNE figure (default: report.tsne_points)")
    report.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device for the t-SNE features")
    report.set_defaults(func=cmd_report)

    convert = commands.add_parser("import-checkpoint", help="convert a checkpoint of the original MSVQ code")
    convert.add_argument("src", help="checkpoint saved by the original MSVQ code")
    convert.add_argument("dst", help="output checkpoint in msvq's format")
    convert.add_argument("--dataset", help="dataset the checkpoint was trained on, if the file does not say")
    convert.set_defaults(func=cmd_import_checkpoint)

    knn = commands.add_parser("knn", help="kNN top-1 of a checkpoint's backbone, or of a random initialisation")
    knn.add_argument("--dataset", required=True, help="dataset name from the params file")
    knn.add_argument("--method", default="msvq", help="method whose params give the architecture (default msvq)")
    knn.add_argument("--params", required=True, help="params file, e.g. config/demo.yaml")
    knn.add_argument("--checkpoint", required=True, help="checkpoint.pt from msvq pretrain, or 'random'")
    knn.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    knn.set_defaults(func=cmd_knn)

    check = commands.add_parser("check-params", help="validate a params file and every merged run",
                                description="Validate a params file against the schema, check every "
                                            "(dataset, method) run after merging its overrides, and check "
                                            "that every override section the workflow tracks is present.")
    check.add_argument("params", help="params file, e.g. config/params.yaml")
    check.add_argument("--stamp", metavar="FILE",
                       help="write FILE after a successful check (DVC's stages depend on it)")
    check.set_defaults(func=cmd_check_params)
    return parser


def known_errors() -> tuple[type[Exception], ...]:
    """Return the failures reported as one message; imported late to keep start-up fast."""
    from msvq.checkpoint import CheckpointError
    from msvq.data import ArchiveError, ChecksumError, DownloadError, PrepareError
    from msvq.device import DeviceError
    from msvq.pretrain import NonFiniteLossError
    from msvq.report import ReportError

    return (ParamsError, DownloadError, ChecksumError, PrepareError, ArchiveError, FileNotFoundError,
            CheckpointError, DeviceError, NonFiniteLossError, FloatingPointError, ReportError)


def main(argv: list[str] | None = None) -> int:

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    level = logging.DEBUG if args.verbose else logging.INFO
    # Under torchrun only rank 0 logs progress, and the other ranks log warnings and errors.
    if os.environ.get("RANK", "0") != "0":
        level = logging.WARNING
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Each process under torchrun prints its own errors, marked with its rank.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = f"(rank {os.environ.get('RANK')} of {world_size}) " if world_size > 1 else ""
    resume_hint = " Run the same command again to resume after the last completed epoch."
    try:
        args.func(args)
    except known_errors() as error:
        print(f"msvq {args.command}: error: {rank}{error}", file=sys.stderr)
        return 1
    except WorkersStopped as stop:
        interrupted = stop.code > 128
        hint = resume_hint if args.command == "pretrain" and interrupted else ""
        label = "interrupted" if interrupted else "error"
        print(f"msvq {args.command}: {label}: {stop}.{hint}", file=sys.stderr)
        return stop.code
    except KeyboardInterrupt:
        hint = resume_hint if args.command == "pretrain" else ""
        print(f"msvq {args.command}: interrupted.{hint}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
