"""msvq pretrain end to end on tiny prepared data: outputs, resume, stale state, NaN."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from msvq import pretrain as pretrain_module
from msvq.checkpoint import build_backbone, load_checkpoint
from msvq.cli import main
from msvq.config import load_params
from msvq.methods import Method
from msvq.pretrain import NonFiniteLossError, pretrain
from tests.tiny import read_rows, tiny_params, wait_for_first_epoch, write_params

REPO = Path(__file__).resolve().parent.parent
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("method", ["msvq", "mocov2"])
def test_pretrain_writes_outputs(tmp_path, tiny_root, method):
    params = load_params(write_params(tmp_path / "p.yaml", tiny_params(tiny_root)))
    out = tmp_path / "out"

    metrics = pretrain(params.run("fashionmnist", method), out)

    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "knn.csv", "metrics.json", "resume",
                                                     "train_log.csv"]
    rows = read_rows(out / "train_log.csv")
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert all(float(row["loss"]) > 0 for row in rows)
    assert [row["epoch"] for row in read_rows(out / "knn.csv")] == ["1", "2", "3"]
    assert 0 <= metrics["knn_top1"] <= 100
    assert json.loads((out / "metrics.json").read_text()) == metrics

    payload = load_checkpoint(out / "checkpoint.pt")
    assert payload["dataset"] == "fashionmnist"
    assert payload["method"] == method
    assert payload["arch"] == {"width": 4, "in_channels": 1, "maxpool": False}
    backbone = build_backbone(payload)
    assert backbone(torch.zeros(2, 1, 16, 16)).shape == (2, 32)


def test_lr_follows_warmup_then_cosine(tmp_path, tiny_root):
    params = load_params(write_params(tmp_path / "p.yaml", tiny_params(tiny_root, knn_every=0)))
    out = tmp_path / "out"
    pretrain(params.run("fashionmnist", "msvq"), out)

    # The log shows the rate of the last step of each epoch: 8 steps per epoch, 24 in all, 8 of
    # warm-up, so the cosine runs over steps 8..23 and epochs 2 and 3 end at steps 15 and 23.
    lrs = [float(row["lr"]) for row in read_rows(out / "train_log.csv")]
    base = params.run("fashionmnist", "msvq").pretrain.lr
    assert lrs[0] == pytest.approx(base)
    assert lrs[1] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 7 / 16)), rel=1e-5)
    assert lrs[2] == pytest.approx(base * 0.5 * (1 + math.cos(math.pi * 15 / 16)), rel=1e-5)


def run_cli(params: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-m", "msvq.cli", "pretrain", "--dataset", "fashionmnist", "--method", "msvq",
         "--params", str(params), "--out", str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_root):
    raw = tiny_params(tiny_root, knn_every=0)
    params_file = write_params(tmp_path / "p.yaml", raw)
    run = load_params(params_file).run("fashionmnist", "msvq")

    pretrain(run, tmp_path / "straight")

    interrupted = tmp_path / "interrupted"
    process = run_cli(params_file, interrupted)
    wait_for_first_epoch(process, interrupted)
    time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert not (interrupted / "checkpoint.pt").exists()
    state = torch.load(interrupted / "resume" / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 3

    resumed = run_cli(params_file, interrupted)
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr.decode()[-2000:]
    assert "resuming from" in stderr.decode()

    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["backbone"]
    again = load_checkpoint(interrupted / "checkpoint.pt")["backbone"]
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key
    assert [row["epoch"] for row in read_rows(interrupted / "train_log.csv")] == ["1", "2", "3"]


def test_state_with_other_params_is_ignored(tmp_path, tiny_root, caplog):
    out = tmp_path / "out"
    first = load_params(write_params(tmp_path / "a.yaml", tiny_params(tiny_root, epochs=2, knn_every=0)))
    pretrain(first.run("fashionmnist", "msvq"), out)

    second = load_params(write_params(tmp_path / "b.yaml", tiny_params(tiny_root, epochs=2, knn_every=0, lr=0.03)))
    with caplog.at_level("INFO"):
        pretrain(second.run("fashionmnist", "msvq"), out)

    assert "made with other parameters" in caplog.text
    assert "resuming" not in caplog.text
    assert [row["epoch"] for row in read_rows(out / "train_log.csv")] == ["1", "2"]
    state = torch.load(out / "resume" / "last.pt", weights_only=True)
    assert state["params_hash"] == second.run("fashionmnist", "msvq").digest("data", "model", "pretrain", "method")


def test_nproc_and_compile_change_resumes_finished_run(tmp_path, tiny_root, caplog, monkeypatch):
    out = tmp_path / "out"
    first = load_params(write_params(tmp_path / "a.yaml", tiny_params(tiny_root, epochs=2, knn_every=0)))
    pretrain(first.run("fashionmnist", "msvq"), out)
    compiled = []
    monkeypatch.setattr(Method, "compile_networks", lambda method: compiled.append(type(method).__name__))

    second = load_params(write_params(tmp_path / "b.yaml",
                                      tiny_params(tiny_root, epochs=2, knn_every=0, nproc=2, compile=True)))
    with caplog.at_level("INFO"):
        pretrain(second.run("fashionmnist", "msvq"), out)

    assert compiled == ["MSVQ"]
    assert "resuming from" in caplog.text
    assert "after epoch 2 of 2" in caplog.text
    assert [row["epoch"] for row in read_rows(out / "train_log.csv")] == ["1", "2"]


def test_state_from_other_code_is_ignored(tmp_path, tiny_root, caplog, monkeypatch):
    out = tmp_path / "out"
    run = load_params(write_params(tmp_path / "a.yaml", tiny_params(tiny_root, epochs=2, knn_every=0))).run(
        "fashionmnist", "msvq")
    pretrain(run, out)

    monkeypatch.setattr(pretrain_module, "source_digest", lambda stage: "edited sources")
    with caplog.at_level("INFO"):
        pretrain(run, out)

    assert "made with other msvq source code" in caplog.text
    assert "resuming" not in caplog.text
    assert [row["epoch"] for row in read_rows(out / "train_log.csv")] == ["1", "2"]
    assert torch.load(out / "resume" / "last.pt", weights_only=True)["code_hash"] == "edited sources"


def test_nan_loss_keeps_last_good_state(tmp_path, tiny_root, monkeypatch):
    real_build = pretrain_module.build_method
    calls = {"n": 0}

    def build_with_nan(*args, **kwargs):
        method = real_build(*args, **kwargs)
        original = method.training_step

        def step(views, generator=None):
            loss = original(views, generator)
            calls["n"] += 1
            return loss * float("nan") if calls["n"] == 11 else loss

        method.training_step = step
        return method

    monkeypatch.setattr(pretrain_module, "build_method", build_with_nan)
    params = load_params(write_params(tmp_path / "p.yaml", tiny_params(tiny_root, knn_every=0)))
    out = tmp_path / "out"

    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 11") as error:
        pretrain(params.run("fashionmnist", "msvq"), out)

    assert "after epoch 1" in str(error.value)
    state = torch.load(out / "resume" / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["method"].values() if value.is_floating_point())
    assert not (out / "checkpoint.pt").exists()


def test_cuda_requested_without_gpu_fails_clearly(tmp_path, tiny_root, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    params_file = write_params(tmp_path / "p.yaml", tiny_params(tiny_root))
    code = main(["pretrain", "--dataset", "fashionmnist", "--method", "msvq", "--params", str(params_file),
                 "--out", str(tmp_path / "out"), "--device", "cuda"])
    assert code == 1
    err = capsys.readouterr().err
    assert "device 'cuda' was requested" in err
    assert "0 device(s) found" in err
    assert not (tmp_path / "out").exists()


def test_missing_prepared_data_names_commands(tmp_path, capsys):
    params_file = write_params(tmp_path / "p.yaml", tiny_params(tmp_path / "empty"))
    code = main(["pretrain", "--dataset", "fashionmnist", "--method", "msvq", "--params", str(params_file),
                 "--out", str(tmp_path / "out")])
    assert code == 1
    assert "msvq prepare fashionmnist" in capsys.readouterr().err


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_short_run_on_real_fashionmnist(tmp_path):
    root = tmp_path / "data"
    assert main(["download", "fashionmnist", "--root", str(root)]) == 0
    assert main(["prepare", "fashionmnist", "--root", str(root)]) == 0
    raw = tiny_params(root, epochs=2, batch_size=64, knn_k=20)
    raw["data"].update(train_subset=512, crop=28)
    params = load_params(write_params(tmp_path / "p.yaml", raw))

    metrics = pretrain(params.run("fashionmnist", "msvq"), tmp_path / "out")

    rows = read_rows(tmp_path / "out" / "train_log.csv")
    assert all(0 < float(row["loss"]) < 100 for row in rows)
    assert 10.0 < metrics["knn_top1"] <= 100.0


def test_subset_larger_than_dataset_is_a_params_error(tmp_path, tiny_root, capsys):
    raw = tiny_params(tiny_root)
    raw["data"]["train_subset"] = 1000
    params_file = write_params(tmp_path / "p.yaml", raw)

    code = main(["pretrain", "--dataset", "fashionmnist", "--method", "msvq", "--params", str(params_file),
                 "--out", str(tmp_path / "out")])

    assert code == 1
    assert "data.train_subset = 1000 exceeds the 256 train images of fashionmnist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_knn_command_scores_checkpoint_and_random(tmp_path, tiny_root, capsys):
    params_file = write_params(tmp_path / "p.yaml", tiny_params(tiny_root, epochs=1, warmup_epochs=0, knn_every=0))
    pretrain(load_params(params_file).run("fashionmnist", "msvq"), tmp_path / "out")

    for checkpoint in (str(tmp_path / "out" / "checkpoint.pt"), "random"):
        assert main(["knn", "--dataset", "fashionmnist", "--params", str(params_file),
                     "--checkpoint", checkpoint]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"fashionmnist {checkpoint}: kNN top-1 ")
        assert 0.0 <= float(line.rsplit(" ", 1)[1]) <= 100.0


def test_interrupt_prints_resume_hint(tmp_path, monkeypatch, capsys):
    def interrupted(run, out, state_dir=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_module, "pretrain", interrupted)
    params_file = write_params(tmp_path / "p.yaml", tiny_params(tmp_path))

    code = main(["pretrain", "--dataset", "fashionmnist", "--method", "msvq", "--params", str(params_file),
                 "--out", str(tmp_path / "out")])

    assert code == 130
    assert "interrupted. Run the same command again to resume" in capsys.readouterr().err
