"""Training as two processes under torchrun (gloo on CPU): results, queues, resume and errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from msvq.checkpoint import load_checkpoint
from msvq.distributed import Ranks, gather_rows, rank_rows, threads_per_process
from tests.tiny import REPO, read_rows, tiny_params, wait_for_first_epoch, write_params

STEPS_SCRIPT = REPO / "tests" / "distributed_steps.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
QUEUE_KEYS = {"msvq": ["queue1", "queue2"], "mocov2": ["queue"]}


def clean_env() -> dict[str, str]:
    """The environment of a fresh command: msvq importable, no torchrun variables, one thread per process."""
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_steps(out: Path, method: str, shuffle_bn: bool, processes: int) -> None:
    command = [sys.executable, str(STEPS_SCRIPT)]
    if processes > 1:
        command = [*TORCHRUN, f"--nproc-per-node={processes}", str(STEPS_SCRIPT)]
    command += ["--method", method, "--out", str(out)] + (["--shuffle-bn"] if shuffle_bn else [])
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=clean_env())
    assert result.returncode == 0, result.stderr[-3000:]


def saved_step(out: Path, rank: int, step: int) -> dict:
    return torch.load(out / f"rank{rank}_step{step}.pt", weights_only=True)


def msvq_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "msvq.cli", *args]


# Rows of a global batch.


@pytest.mark.parametrize(("total", "world_size"), [(16, 2), (16, 4), (7, 2), (3, 4)])
def test_rank_rows_cover_batch_in_order(total, world_size):
    shares = [rank_rows(total, Ranks(rank, rank, world_size)) for rank in range(world_size)]

    assert len({len(share) for share in shares}) == 1
    assert torch.equal(torch.cat(shares)[:total], torch.arange(total))
    assert int(torch.cat(shares).max()) == total - 1


def test_gather_rows_single_process_returns_rows():
    rows = torch.arange(12.0).view(6, 2)

    assert torch.equal(gather_rows(rows, 5, Ranks()), rows[:5])


# Steps under torchrun, compared with one process.


@pytest.mark.parametrize("method", ["msvq", "mocov2"])
def test_two_processes_match_one_process(tmp_path, method):
    run_steps(tmp_path / "one", method, shuffle_bn=False, processes=1)
    run_steps(tmp_path / "two", method, shuffle_bn=False, processes=2)

    for step in range(3):
        single = saved_step(tmp_path / "one", 0, step)
        pair = saved_step(tmp_path / "two", 0, step)
        assert pair["loss"] == pytest.approx(single["loss"], abs=1e-5), f"loss of step {step}"
        for queue in QUEUE_KEYS[method]:
            torch.testing.assert_close(pair["state"][f"{queue}.features"], single["state"][f"{queue}.features"],
                                       atol=1e-5, rtol=0, msg=f"{queue} after step {step}")
            assert torch.equal(pair["state"][f"{queue}.ptr"], single["state"][f"{queue}.ptr"])
    for key, value in single["state"].items():
        torch.testing.assert_close(pair["state"][key], value, atol=1e-5, rtol=0, msg=f"{key} after 3 steps")


@pytest.mark.parametrize("method", ["msvq", "mocov2"])
def test_shuffled_ranks_hold_identical_queues_and_teachers(tmp_path, method):
    run_steps(tmp_path / "two", method, shuffle_bn=True, processes=2)
    run_steps(tmp_path / "one", method, shuffle_bn=True, processes=1)

    teacher_prefixes = ("teacher1.", "teacher2.", "key_encoder.")
    for step in range(3):
        rank0, rank1 = saved_step(tmp_path / "two", 0, step), saved_step(tmp_path / "two", 1, step)
        assert rank0["loss"] == rank1["loss"]
        compared = [key for key in rank0["state"] if key.startswith(teacher_prefixes) or key.startswith("queue")]
        assert len(compared) > 10
        for key in compared:
            assert torch.equal(rank0["state"][key], rank1["state"][key]), f"{key} differs after step {step}"

        # The permutation spans the global batch, so shuffling matches one process too.
        single = saved_step(tmp_path / "one", 0, step)
        assert rank0["loss"] == pytest.approx(single["loss"], abs=1e-5), f"loss of step {step}"


# msvq pretrain and linear-eval with nproc 2.


def process_tree(pid: int) -> list[int]:
    """Return ``pid`` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The field after the parenthesised command name is the state, then the parent pid.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending += children.get(current, [])
    return tree


@pytest.fixture
def two_process_params(tmp_path, tiny_root) -> Path:
    raw = tiny_params(tiny_root, epochs=4, knn_every=2, nproc=2)
    raw["model"]["bn_splits"] = 4
    raw["linear"].update(nproc=2, epochs=2, batch_size=50, mode="augmented")
    return write_params(tmp_path / "two.yaml", raw)


def pretrain_command(params: Path, out: Path) -> list[str]:
    return msvq_command("pretrain", "--dataset", "fashionmnist", "--method", "msvq", "--params", str(params),
                        "--out", str(out))


def test_pretrain_resumes_two_processes_after_sigkill(tmp_path, two_process_params):
    straight = subprocess.run(pretrain_command(two_process_params, tmp_path / "straight"), capture_output=True,
                              text=True, timeout=300, env=clean_env())
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "2 processes of 16 images per step" in straight.stderr

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(pretrain_command(two_process_params, interrupted), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=clean_env())
    wait_for_first_epoch(process, interrupted)
    workers = process_tree(process.pid)[1:]
    assert len(workers) >= 2, "expected the two worker processes under the launcher"
    # Only the launcher is killed. Its workers run in sessions of their own (torch 2.14),
    # so they would go on training unless they exit with their parent.
    process.kill()
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
        time.sleep(0.05)
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()], "workers outlived the killed launcher"
    assert not (interrupted / "checkpoint.pt").exists()
    state = torch.load(interrupted / "resume" / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 4

    resumed = subprocess.run(pretrain_command(two_process_params, interrupted), capture_output=True, text=True,
                             timeout=300, env=clean_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {interrupted / 'resume' / 'last.pt'} after epoch {state['epoch']}" in resumed.stderr

    expected = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["backbone"]
    weights = load_checkpoint(interrupted / "checkpoint.pt")["backbone"]
    assert weights.keys() == expected.keys()
    for key in expected:
        assert torch.equal(weights[key], expected[key]), key
    assert read_rows(interrupted / "knn.csv") == read_rows(tmp_path / "straight" / "knn.csv")


def run_one_and_two_processes(tmp_path: Path, two_process_params: Path, section: str, command: list[str],
                              csv_name: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Run ``msvq COMMAND --params P --out O`` with ``section``.nproc 1 and 2; return both runs' CSV rows."""
    raw = yaml.safe_load(two_process_params.read_text())
    raw[section]["nproc"] = 1
    one_process_params = write_params(tmp_path / "one.yaml", raw)
    for params, out in ((one_process_params, "one"), (two_process_params, "two")):
        result = subprocess.run(msvq_command(*command, "--params", str(params), "--out", str(tmp_path / out)),
                                capture_output=True, text=True, timeout=300, env=clean_env())
        assert result.returncode == 0, result.stderr[-3000:]
    return read_rows(tmp_path / "one" / csv_name), read_rows(tmp_path / "two" / csv_name)


def test_pretrain_two_processes_match_one(tmp_path, two_process_params):
    one_process, two_processes = run_one_and_two_processes(
        tmp_path, two_process_params, "pretrain",
        ["pretrain", "--dataset", "fashionmnist", "--method", "msvq"], "train_log.csv",
    )

    assert len(one_process) == len(two_processes) == 4
    for row_one, row_two in zip(one_process, two_processes):
        assert float(row_two["loss"]) == pytest.approx(float(row_one["loss"]), abs=1e-5)
        # The kNN monitor gathers both ranks' features of all images.
        assert row_two["knn_top1"] == row_one["knn_top1"]


def test_linear_eval_two_processes_match_one(tmp_path, two_process_params):
    # 256 images in batches of 50 end with a batch of 6 rows, 3 per rank.
    one_process, two_processes = run_one_and_two_processes(
        tmp_path, two_process_params, "linear",
        ["linear-eval", "--dataset", "fashionmnist", "--method", "msvq", "--checkpoint", "random"], "curve.csv",
    )

    assert len(one_process) == len(two_processes) == 2
    for row_one, row_two in zip(one_process, two_processes):
        assert float(row_two["loss"]) == pytest.approx(float(row_one["loss"]), abs=1e-5)
        assert row_two["top1"] == row_one["top1"]


# Settings that do not divide among the processes.


def test_indivisible_batch_fails_before_starting_processes(tmp_path, two_process_params):
    raw = yaml.safe_load(two_process_params.read_text())
    raw["pretrain"]["nproc"] = 3
    params = write_params(tmp_path / "three.yaml", raw)

    result = subprocess.run(pretrain_command(params, tmp_path / "out"), capture_output=True, text=True,
                            timeout=120, env=clean_env())

    assert result.returncode == 1
    assert "pretrain.batch_size = 32 must be divisible by pretrain.nproc = 3" in result.stderr
    assert "starting 3 processes" not in result.stderr
    assert not (tmp_path / "out").exists()
    check = subprocess.run(msvq_command("check-params", str(params)), capture_output=True, text=True,
                           timeout=120, env=clean_env())
    assert check.returncode == 1
    assert "pretrain.batch_size = 32 must be divisible by pretrain.nproc = 3" in check.stderr


def test_indivisible_batch_under_torchrun_fails_before_training(tmp_path, two_process_params):
    raw = yaml.safe_load(two_process_params.read_text())
    raw["pretrain"]["nproc"] = 1
    raw["model"]["bn_splits"] = 2
    params = write_params(tmp_path / "one.yaml", raw)
    out = tmp_path / "out"

    result = subprocess.run(
        [*TORCHRUN, "--nproc-per-node=3", "-m", "msvq.cli",
         *pretrain_command(params, out)[3:]],
        capture_output=True, text=True, timeout=300, env=clean_env(),
    )

    assert result.returncode != 0
    assert "msvq pretrain: error: " in result.stderr
    assert "pretrain.batch_size = 32 does not divide by the 3 processes (WORLD_SIZE)" in result.stderr
    assert "epoch 1/" not in result.stderr
    assert not (out / "resume" / "last.pt").exists()
    assert not (out / "checkpoint.pt").exists()


def test_bn_splits_must_divide_among_processes(tmp_path, two_process_params):
    raw = yaml.safe_load(two_process_params.read_text())
    raw["model"]["bn_splits"] = 1
    params = write_params(tmp_path / "plain_bn.yaml", raw)

    result = subprocess.run(pretrain_command(params, tmp_path / "out"), capture_output=True, text=True,
                            timeout=120, env=clean_env())

    assert result.returncode == 1
    assert "model.bn_splits = 1 must be divisible by pretrain.nproc = 2" in result.stderr


def test_interrupt_stops_workers_and_exits_130(tmp_path, two_process_params):
    out = tmp_path / "out"
    process = subprocess.Popen(pretrain_command(two_process_params, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, env=clean_env())
    wait_for_first_epoch(process, out)
    workers = process_tree(process.pid)[1:]

    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 130, stderr.decode()[-2000:]
    assert "msvq pretrain: interrupted: stopped by SIGINT. Run the same command again to resume" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def test_threads_split_among_processes(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    assert threads_per_process(2) == 4
    assert threads_per_process(16) == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert threads_per_process(1) == os.cpu_count()


def test_missing_inputs_fail_before_starting_processes(tmp_path, two_process_params):
    raw = yaml.safe_load(two_process_params.read_text())
    raw["data"]["root"] = str(tmp_path / "empty")
    no_data = write_params(tmp_path / "no_data.yaml", raw)
    linear = msvq_command("linear-eval", "--dataset", "fashionmnist", "--method", "msvq", "--params",
                          str(two_process_params), "--checkpoint", str(tmp_path / "none.pt"), "--out",
                          str(tmp_path / "linear"))

    missing_data = subprocess.run(pretrain_command(no_data, tmp_path / "out"), capture_output=True, text=True,
                                  timeout=120, env=clean_env())
    missing_checkpoint = subprocess.run(linear, capture_output=True, text=True, timeout=120, env=clean_env())

    assert missing_data.returncode == 1
    assert "msvq pretrain: error: " in missing_data.stderr
    assert "prepared dataset not found" in missing_data.stderr
    assert "starting 2 processes" not in missing_data.stderr
    assert not (tmp_path / "out").exists()
    assert missing_checkpoint.returncode == 1
    assert f"checkpoint not found: {tmp_path / 'none.pt'}" in missing_checkpoint.stderr
    assert "starting 2 processes" not in missing_checkpoint.stderr
    assert not (tmp_path / "linear").exists()
