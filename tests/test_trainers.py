"""The reference trainers (python/, package fdsm_train): every experiment's smoke run per loss, exact
resume, DDP equivalence, stopping on a non-finite loss or a signal, clear configuration errors, and the
image readers without torchvision (the CIFAR-10 unpickler refusing code). The fault suite is
tests/test_trainer_faults.py.

Needs ``pip install ./python`` (or ``-e``); skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

fdsm_train = pytest.importorskip("fdsm_train", reason="install the trainers: pip install ./python")

from fdsm_train import distributed  # noqa: E402
from fdsm_train.checkpoint import read_checkpoint  # noqa: E402
from fdsm_train.cli import main  # noqa: E402
from fdsm_train.data.toy import sample_toy  # noqa: E402
from fdsm_train.experiments import toy  # noqa: E402
from fdsm_train.models.mlp import MLPLogDensity  # noqa: E402
from fdsm_train.objectives import LOSSES, score_matching_loss  # noqa: E402
from fdsm_train.scalars import read_scalars  # noqa: E402
from fdsm_train.trainer import NonFiniteLossError, Trainer, seed_everything  # noqa: E402

QUIET = ["--no-progress"]


def _metrics(run_dir):
    import json

    with open(os.path.join(run_dir, "metrics.json")) as fh:
        return json.load(fh)


# --------------------------------------------------------------------------- smoke runs
@pytest.mark.parametrize("loss", LOSSES)
def test_toy_smoke(tmp_path, loss):
    assert main(["toy", "--smoke", "--loss", loss, "--out", str(tmp_path), *QUIET]) == 0
    run = tmp_path / "mog" / loss
    m = _metrics(run)
    assert m["steps"] == toy.SMOKE["steps"]
    assert torch.isfinite(torch.tensor(m["heldout_exact_sm"]))
    assert torch.isfinite(torch.tensor(m["heldout_nll"]))
    assert m["mmd2"] is not None and torch.isfinite(torch.tensor(m["mmd2"]))
    for f in ("toy.png", "scalars.csv", "config.yaml", "checkpoints/last.pt"):
        assert (run / f).is_file(), f
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "toy.png").is_file()


EXPERIMENT_RUNS = [  # (experiment, loss, sub-directory, metrics that must be finite, files)
    *[("dkef", loss, "wine", ("test_nll", "test_exact_sm", "is_ess"), ("dkef.png",)) for loss in LOSSES],
    *[("nice", loss, "digits", ("test_bpd", "test_nll_logit", "test_exact_sm"), ("nice.png", "samples.png"))
      for loss in LOSSES],
    *[("ebm", loss, "digits", ("test_dsm", "mmd2"), ("ebm.png", "samples.png")) for loss in ("fd_dsm", "dsm")],
]


@pytest.mark.parametrize("experiment, loss, sub, keys, files", EXPERIMENT_RUNS,
                         ids=[f"{e}-{l}" for e, l, *_ in EXPERIMENT_RUNS])
def test_experiment_smoke(tmp_path, experiment, loss, sub, keys, files):
    assert main([experiment, "--smoke", "--loss", loss, "--out", str(tmp_path), *QUIET]) == 0
    run = tmp_path / sub / loss
    m = _metrics(run)
    assert m["loss"] == loss and m["steps"] >= 1
    for key in keys:
        assert m[key] is not None and torch.isfinite(torch.tensor(m[key])), key
    for f in (*files, "scalars.csv", "checkpoints/last.pt"):
        assert (run / f).is_file(), f


def test_ebm_rejects_losses_it_cannot_train(tmp_path, capsys):
    assert main(["ebm", "--smoke", "--loss", "fd_ssm", "--out", str(tmp_path), *QUIET]) == 2
    assert "unknown loss 'fd_ssm' for this experiment; choose from fd_dsm, dsm" in capsys.readouterr().err


# --------------------------------------------------------------------------- resume
def test_resume_matches_uninterrupted_run_bitwise(tmp_path):
    common = ["toy", "--smoke", "--log-every", "1", "--ckpt-every", "8", *QUIET]
    assert main([*common, "--steps", "40", "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--steps", "24", "--out", str(tmp_path / "split")]) == 0
    assert main([*common, "--steps", "40", "--out", str(tmp_path / "split"), "--resume"]) == 0
    full, split = tmp_path / "full" / "mog" / "fd_ssm", tmp_path / "split" / "mog" / "fd_ssm"
    a = read_scalars(str(full / "scalars.csv"), "train/loss")
    b = read_scalars(str(split / "scalars.csv"), "train/loss")
    assert len(a) == 40 and a == b  # floats compared exactly
    ca, cb = read_checkpoint(full / "checkpoints" / "last.pt"), read_checkpoint(split / "checkpoints" / "last.pt")
    assert ca["step"] == cb["step"] == 40
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for key in ca["ema"]:
        assert torch.equal(ca["ema"][key], cb["ema"][key]), key


def test_existing_run_needs_resume(tmp_path, capsys):
    args = ["toy", "--smoke", "--steps", "3", "--out", str(tmp_path), *QUIET]
    assert main(args) == 0
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err


def test_sigterm_writes_checkpoint_then_resume_finishes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fdsm_train", "toy", "--smoke", "--steps", "100000", "--log-every", "1",
           "--ckpt-every", "100000", "--out", str(out), *QUIET]
    # cwd outside the repository: `python -m` puts the cwd first on sys.path, where the repository's
    # unbuilt fdsm_ext/ sources would shadow the installed package.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    csv = out / "mog" / "fd_ssm" / "scalars.csv"
    deadline = time.time() + 60
    while time.time() < deadline and not (csv.is_file() and len(csv.read_text().splitlines()) > 1):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM at step" in err and "--resume" in err
    ckpt = read_checkpoint(out / "mog" / "fd_ssm" / "checkpoints" / "last.pt")
    assert ckpt["step"] >= 1
    steps = read_scalars(str(csv), "train/loss")
    assert steps[-1][0] == ckpt["step"]
    assert main(["toy", "--smoke", "--steps", str(ckpt["step"] + 3), "--out", str(out), "--resume", *QUIET]) == 0
    assert read_checkpoint(out / "mog" / "fd_ssm" / "checkpoints" / "last.pt")["step"] == ckpt["step"] + 3


# --------------------------------------------------------------------------- non-finite loss
def test_nonfinite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    cfg = toy.Config(steps=20, batch_size=16, ckpt_every=5, log_every=1, threads=1)
    seed_everything(0)
    model = MLPLogDensity(2, 8, 1)
    calls = []

    def loss_fn(net, x, generator):
        calls.append(1)
        loss = score_matching_loss("fd_ssm", net, x, cfg, generator)
        return loss * float("nan") if len(calls) == 7 else loss

    trainer = Trainer(cfg, model, sample_toy("mog", 64, 0), loss_fn, str(tmp_path), progress=False)
    with pytest.raises(NonFiniteLossError, match=r"is nan at step 7;.*last good checkpoint .*last\.pt \(step 5\)"):
        trainer.fit()
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["step"] == 5
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert [s for s, _ in read_scalars(str(tmp_path / "scalars.csv"), "train/loss")] == list(range(1, 7))


# --------------------------------------------------------------------------- step time
def test_step_time_median_is_not_recomputed_every_step(tmp_path, monkeypatch):
    # the median sorts the whole history: once per step, 10^5-step runs spent tens of ms per step on it
    import statistics

    from fdsm_train import trainer as trainer_module

    calls, median = [], statistics.median

    def counting_median(values):
        calls.append(len(values))
        return median(values)

    monkeypatch.setattr(trainer_module.statistics, "median", counting_median)
    cfg = toy.Config(steps=60, batch_size=16, ckpt_every=25, log_every=1, threads=1)
    seed_everything(0)
    result = Trainer(cfg, MLPLogDensity(2, 8, 1), sample_toy("mog", 64, 0),
                     lambda net, x, g: score_matching_loss("fd_ssm", net, x, cfg, g), str(tmp_path),
                     progress=False).fit()
    assert len(calls) <= 4, calls  # checkpoints at 25, 50, 60 and the result, not 60 times
    assert calls[-1] == 60 and 0 < result.seconds_per_step < float("inf")
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["seconds_per_step"] == result.seconds_per_step
    assert 0 < result.seconds_per_step_q20 <= result.seconds_per_step <= result.seconds_per_step_q80


def test_metrics_json_has_step_time_quantiles(tmp_path):
    assert main(["toy", "--smoke", "--steps", "12", "--out", str(tmp_path), *QUIET]) == 0
    m = _metrics(tmp_path / "mog" / "fd_ssm")
    assert 0 < m["seconds_per_step_q20"] <= m["seconds_per_step"] <= m["seconds_per_step_q80"]


# --------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_for_ddp_test(run_dir: str, info) -> list:
    """A few steps of exact SM (deterministic: no random directions) recording every gradient."""
    cfg = toy.Config(loss="exact_sm", steps=4, batch_size=32, log_every=1, ckpt_every=100, threads=1)
    seed_everything(0)
    model = MLPLogDensity(2, 16, 2)
    grads = []

    def record(step, m):
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in m.parameters()])

    Trainer(cfg, model, sample_toy("mog", 200, 0), lambda net, x, g: score_matching_loss(cfg.loss, net, x, cfg, g),
            run_dir, dist_info=info, progress=False, after_backward=record).fit()
    return grads


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    # the environment torchrun would set, so distributed.setup takes its torchrun path
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    info = distributed.setup("cpu")
    try:
        torch.save(_train_for_ddp_test(os.path.join(out_dir, "ddp"), info), os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        distributed.teardown()


def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    single = _train_for_ddp_test(str(tmp_path / "single"), None)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"grads{rank}.pt")
        assert len(ddp) == len(single) == 4
        for step_single, step_ddp in zip(single, ddp):  # all-reduced gradients == full-batch gradients
            for g1, g2 in zip(step_single, step_ddp):
                torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    loss_single = read_scalars(str(tmp_path / "single" / "scalars.csv"), "train/loss")
    loss_ddp = read_scalars(str(tmp_path / "ddp" / "scalars.csv"), "train/loss")
    assert [s for s, _ in loss_ddp] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([v for _, v in loss_ddp]), torch.tensor([v for _, v in loss_single]),
                               rtol=1e-5, atol=1e-6)


def test_distributed_sampler_batches_partition_the_global_batch():
    from fdsm_train.trainer import epoch_batches

    one = epoch_batches(103, 8, epoch=3, seed=5)
    two = [epoch_batches(103, 8, epoch=3, seed=5, rank=r, world_size=2) for r in (0, 1)]
    assert one.shape == (12, 8) and two[0].shape == two[1].shape == (12, 4)
    for b in range(12):
        assert sorted(torch.cat([two[0][b], two[1][b]]).tolist()) == sorted(one[b].tolist())


# --------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize("args, message", [
    (["toy", "--loss", "nope"], "unknown loss 'nope'"),
    (["toy", "--loss", "fd_ssm,nope"], "unknown loss 'nope'"),
    (["toy", "--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["toy", "--eps", "-0.1"], "--eps must be a finite number > 0, got -0.1"),
    (["toy", "--density", "square"], "unknown density 'square'"),
    (["toy", "--config", "/nonexistent/cfg.yaml"], "'/nonexistent/cfg.yaml'"),
    (["toy", "--steps", "ten"], "--steps must be an int, got 'ten'"),
    (["nosuch"], "unknown experiment 'nosuch'"),
    (["dkef", "--dataset", "redwine", "--data-path", "/nonexistent/winequality-red.csv"],
     "redwine data file not found: '/nonexistent/winequality-red.csv'"),
    (["dkef", "--dataset", "parkinsons"], "needs --data-path pointing to the UCI file parkinsons_updrs.data"),
    (["dkef", "--batch-size", "1"], "--batch-size must be >= 2"),
    (["nice", "--dataset", "mnist", "--data-root", "/nonexistent/mnist"], "'/nonexistent/mnist'"),
    (["nice", "--dataset", "mnist"], "dataset 'mnist' needs --data-root"),
    (["ebm", "--sigma-min", "0.5", "--sigma-max", "0.1"], "sigma_min <= sigma_max"),
])
def test_bad_config_is_a_clear_error(tmp_path, capsys, args, message):
    assert main([*args, "--smoke", "--out", str(tmp_path), *QUIET] if args != ["nosuch"] else args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def test_yaml_config_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 4\nlr: 0.01\nhidden: 8\neps: 5e-2\n")
    assert main(["toy", "--smoke", "--config", str(tmp_path / "c.yaml"), "--lr", "2e-2", "--out",
                 str(tmp_path / "o"), *QUIET]) == 0
    cfg = _metrics(tmp_path / "o" / "mog" / "fd_ssm")["config"]
    assert (cfg["steps"], cfg["lr"], cfg["hidden"], cfg["eps"], cfg["depth"]) == (4, 0.02, 8, 0.05,
                                                                                  toy.SMOKE["depth"])


def _write_idx(path, magic, arr):
    import gzip

    import numpy as np

    header = magic.to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    data = header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as fh:
        fh.write(data)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files_read_by_both_image_loaders(tmp_path, monkeypatch, gz):
    # Both image loaders (NICE/EBM and NCSN) read MNIST through one reader, which falls back to the raw
    # IDX files when torchvision cannot be imported (forced here).
    import numpy as np

    from fdsm_train.data import image_datasets, images

    monkeypatch.setitem(sys.modules, "torchvision", None)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    want = {"train": rng.integers(0, 256, (5, 28, 28)), "test": rng.integers(0, 256, (3, 28, 28))}
    suffix = ".gz" if gz else ""
    _write_idx(str(raw / f"train-images-idx3-ubyte{suffix}"), 2051, want["train"])
    _write_idx(str(raw / f"t10k-images-idx3-ubyte{suffix}"), 2051, want["test"])
    split, levels = images.load_images("mnist", str(tmp_path))
    assert levels == 256
    for k in ("train", "test"):
        assert torch.equal(split[k], torch.from_numpy(want[k].astype(np.float32))[:, None])
        got = image_datasets.load_images("mnist", str(tmp_path), split=k)
        assert got.dtype == torch.uint8 and torch.equal(got, torch.from_numpy(want[k].astype(np.uint8))[:, None])
    _write_idx(str(raw / f"t10k-images-idx3-ubyte{suffix}"), 2049, want["test"][:, 0])
    with pytest.raises(ValueError, match="not an MNIST image file"):
        images.read_mnist(str(tmp_path), "test")


# --------------------------------------------------------------------------- CIFAR-10 without torchvision
def _write_cifar_batches(root, protocol=2, evil=None):
    """CIFAR-10's python layout under ``root`` (2 images per batch); ``evil`` replaces data_batch_1's dict."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arrays[name] = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        batch = {b"batch_label": b"x", b"labels": [3, 7], b"data": arrays[name], b"filenames": [b"a.png", b"b.png"]}
        if evil is not None and name == "data_batch_1":
            batch = evil
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return arrays


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_batches_read_without_torchvision(tmp_path, monkeypatch, protocol):
    import numpy as np

    from fdsm_train.data import image_datasets

    monkeypatch.setitem(sys.modules, "torchvision", None)
    arrays = _write_cifar_batches(tmp_path, protocol)
    train = image_datasets.load_images("cifar10", str(tmp_path), split="train")
    want = np.concatenate([arrays[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert train.dtype == torch.uint8 and torch.equal(train, torch.from_numpy(want))
    test = image_datasets.load_images("cifar10", str(tmp_path), split="test")
    assert torch.equal(test, torch.from_numpy(arrays["test_batch"].reshape(-1, 3, 32, 32)))


class _RunsCode:
    """Pickles as a call of ``func(*args)``: what a crafted data_batch_1 would hold."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", ["os.system", "builtins.exec"])
def test_crafted_cifar10_batch_cannot_run_code(tmp_path, monkeypatch, capsys, func):
    import builtins

    marker = tmp_path / "code_ran"
    call = (_RunsCode(os.system, f"touch {marker}") if func == "os.system" else
            _RunsCode(builtins.exec, f"open({str(marker)!r}, 'w').close()"))
    monkeypatch.setitem(sys.modules, "torchvision", None)
    _write_cifar_batches(tmp_path, evil={b"data": call})
    from fdsm_train.data import image_datasets

    refused = r"data_batch_1: not a CIFAR-10 batch \(refusing to load (posix|__builtin__|builtins)\.(system|exec):"
    with pytest.raises(ValueError, match=refused):
        image_datasets.load_images("cifar10", str(tmp_path))
    assert main(["ncsn", "--smoke", "--dataset", "cifar10", "--data-root", str(tmp_path), "--out",
                 str(tmp_path / "out"), *QUIET]) == 2
    err = capsys.readouterr().err.strip()
    assert "refusing to load" in err and len(err.splitlines()) == 1
    assert not marker.exists()
