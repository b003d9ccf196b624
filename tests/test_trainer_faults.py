"""The trainer fault suite: kill -9 and SIGTERM/SIGINT during a step and during evaluation, writes failing
mid-run and mid-resume (``RLIMIT_FSIZE``), damaged checkpoints of every kind, read-only folders and bad
flags. Each case ends with its documented exit code (0 done, 1 non-finite loss, 2 cannot run as asked,
143 stopped by a signal), resumes where it can, and loses nothing already written: the rows of
``scalars.csv`` before the fault are, byte for byte, the first rows after it (a resume recomputes the
rows past its checkpoint bit for bit, so they come back identical too).

The toy experiment at a tiny size (8-wide MLP, 2 Langevin steps, an 8x8 grid) keeps each case to a
few seconds; signals and resource limits run ``fdsm-train`` in a subprocess with a timeout.
"""

from __future__ import annotations

import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

fdsm_train = pytest.importorskip("fdsm_train", reason="install the trainers: pip install ./python")

from fdsm_train.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from fdsm_train.cli import main  # noqa: E402
from fdsm_train.data.toy import sample_toy  # noqa: E402
from fdsm_train.experiments import toy  # noqa: E402
from fdsm_train.models.mlp import MLPLogDensity  # noqa: E402
from fdsm_train.objectives import score_matching_loss  # noqa: E402
from fdsm_train.trainer import NonFiniteLossError, Trainer, seed_everything  # noqa: E402

TINY = ["toy", "--smoke", "--n-train", "512", "--n-test", "64", "--hidden", "8", "--batch-size", "32",
        "--grid", "8", "--n-samples", "32", "--langevin-steps", "2", "--log-every", "1", "--no-progress"]
BASE_STEPS, BASE_CKPT_EVERY = 40, 32  # checkpoints: prev.pt at step 32, last.pt at step 40
TIMEOUT = 120
RUN = ("mog", "fd_ssm")


def _run_dir(out):
    return os.path.join(str(out), *RUN)


def _csv(out) -> bytes:
    with open(os.path.join(_run_dir(out), "scalars.csv"), "rb") as fh:
        return fh.read()


def _complete_rows(data: bytes) -> list[bytes]:
    """The complete lines of a scalars.csv (a torn last line is no row)."""
    lines = data.splitlines(keepends=True)
    return [line for line in lines if line.endswith(b"\n")]


def _ckpt(out, name="last.pt"):
    return os.path.join(_run_dir(out), "checkpoints", name)


def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _cli(*args) -> list[str]:
    # cwd outside the repository: `python -m` puts the cwd first on sys.path
    return [sys.executable, "-m", "fdsm_train", *TINY, *args]


def _subprocess(args, cwd, *, fsize: int | None = None, timeout=TIMEOUT) -> subprocess.CompletedProcess:
    def limit():
        if fsize is not None:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()  # a run sets its --threads in this process
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished 40-step run: last.pt (step 40), prev.pt (step 32), 40 rows of scalars.csv."""
    out = tmp_path_factory.mktemp("base")
    assert main([*TINY, "--steps", str(BASE_STEPS), "--ckpt-every", str(BASE_CKPT_EVERY), "--out", str(out)]) == 0
    assert read_checkpoint(_ckpt(out))["step"] == BASE_STEPS
    assert read_checkpoint(_ckpt(out, "prev.pt"))["step"] == BASE_CKPT_EVERY
    assert len(_complete_rows(_csv(out))) == 1 + BASE_STEPS
    return out


@pytest.fixture
def run_copy(base_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(base_run, out)
    return out


def _resume(out, steps, capsys=None, *extra):
    rc = main([*TINY, "--steps", str(steps), "--out", str(out), "--resume", *extra])
    return rc, (capsys.readouterr().err if capsys is not None else "")


def _assert_resumed_without_loss(out, before: bytes, steps: int):
    """The resumed run reached ``steps`` and every complete row written before is still there, unchanged."""
    rows_before, rows_after = _complete_rows(before), _complete_rows(_csv(out))
    assert rows_after[:len(rows_before)] == rows_before
    assert len(rows_after) == 1 + steps
    assert read_checkpoint(_ckpt(out))["step"] == steps


# --------------------------------------------------------------------------- damaged checkpoints
def _flip_16_bytes_in_a_tensor_record(path):
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(_read(path))
    name_len, extra_len = (int.from_bytes(data[info.header_offset + k: info.header_offset + k + 2], "little")
                           for k in (26, 28))
    start = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    for i in range(start, start + 16):
        data[i] ^= 0xFF
    with open(path, "wb") as fh:
        fh.write(data)


def _damage(path, kind):
    if kind == "truncated":
        data = _read(path)
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 2])
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "garbage":
        with open(path, "wb") as fh:
            fh.write(random.Random(0).randbytes(4096))
    elif kind == "keyless":
        torch.save({"model": {}}, path)
    elif kind == "bitflip":
        _flip_16_bytes_in_a_tensor_record(path)
    elif kind == "negative_step":  # crafted: a valid checksum over a step of -5
        ckpt = read_checkpoint(path)
        write_checkpoint({**{k: v for k, v in ckpt.items() if k != "checksum"}, "step": -5}, path)
    else:
        raise ValueError(kind)


DAMAGE = {"truncated": "not a readable checkpoint", "empty": "empty file", "garbage": "not a readable checkpoint",
          "keyless": "missing key(s)", "bitflip": "checksum mismatch", "negative_step": "`step` is -5"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_falls_back_to_prev_or_exits_2(run_copy, capsys, kind):
    out, last, prev = run_copy, _ckpt(run_copy), _ckpt(run_copy, "prev.pt")
    before, good_prev = _csv(out), _read(prev)

    # both damaged: exit 2, one line naming both files and what to do, nothing touched
    _damage(last, kind)
    _damage(prev, kind)
    damaged = (_read(last), _read(prev))
    rc, err = _resume(out, BASE_STEPS + 4, capsys)
    assert rc == 2, err
    line = _one_line(err)
    assert "no usable checkpoint" in line and "last.pt" in line and "prev.pt" in line and "move" in line
    assert DAMAGE[kind] in line
    assert _csv(out) == before and (_read(last), _read(prev)) == damaged

    # last.pt damaged, prev.pt good: resume from prev.pt, saying so, naming both
    with open(prev, "wb") as fh:
        fh.write(good_prev)
    rc, err = _resume(out, BASE_STEPS + 4, capsys)
    assert rc == 0, err
    assert "last.pt" in err and DAMAGE[kind] in err and f"prev.pt (step {BASE_CKPT_EVERY})" in err
    _assert_resumed_without_loss(out, before, BASE_STEPS + 4)


def test_missing_last_pt_resumes_from_prev(run_copy, capsys):
    # a kill between "last.pt -> prev.pt" and "new -> last.pt" leaves only prev.pt (and the temporary)
    before = _csv(run_copy)
    stale = os.path.join(os.path.dirname(_ckpt(run_copy)), ".last.pt.abc123.tmp")
    os.replace(_ckpt(run_copy), stale)
    rc, err = _resume(run_copy, BASE_STEPS + 2, capsys)
    assert rc == 0 and "no such file" in err and "prev.pt" in err
    _assert_resumed_without_loss(run_copy, before, BASE_STEPS + 2)
    assert not os.path.exists(stale)


def test_checkpoints_load_weights_only_and_carry_a_checksum(base_run):
    ckpt = torch.load(_ckpt(base_run), weights_only=True)
    assert ckpt["checksum"].startswith("sha256:") and ckpt["step"] == BASE_STEPS


# --------------------------------------------------------------------------- writes failing
def test_resume_with_failing_writes_keeps_scalars(run_copy, tmp_path):
    # last.pt at step 32 while scalars.csv holds rows to 40: the resume must drop rows 33..40, and on
    # a full disk it must fail before changing a byte (it used to cut the file)
    shutil.copyfile(_ckpt(run_copy, "prev.pt"), _ckpt(run_copy))
    before = _csv(run_copy)
    config_size = os.path.getsize(os.path.join(_run_dir(run_copy), "config.yaml"))
    kept_size = len(b"".join(_complete_rows(before)[: 1 + BASE_CKPT_EVERY]))
    assert config_size < kept_size
    proc = _subprocess(_cli("--steps", "48", "--out", str(run_copy), "--resume"), tmp_path,
                       fsize=(config_size + kept_size) // 2)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert "scalars.csv" in line and "File too large" in line and "--resume" in line
    assert _csv(run_copy) == before
    assert read_checkpoint(_ckpt(run_copy))["step"] == BASE_CKPT_EVERY
    rc = main([*TINY, "--steps", "48", "--out", str(run_copy), "--resume"])
    assert rc == 0
    _assert_resumed_without_loss(run_copy, before, 48)  # rows 33..40 recomputed bit for bit


@pytest.mark.parametrize("fails", ["scalars", "checkpoint"])
def test_writes_failing_mid_run_lose_nothing(run_copy, tmp_path, fails):
    before = _csv(run_copy)
    last_before = _read(_ckpt(run_copy))
    # scalars.csv may grow by ~4 rows; or it may grow freely but a checkpoint (~20 kB) cannot be written
    fsize = len(before) + 150 if fails == "scalars" else len(before) + 4000
    proc = _subprocess(_cli("--steps", "120", "--ckpt-every", "24", "--out", str(run_copy), "--resume"), tmp_path,
                       fsize=fsize)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert ("scalars.csv" if fails == "scalars" else "last.pt") in line and "File too large" in line
    assert f"last good checkpoint is {_ckpt(run_copy)} (step {BASE_STEPS})" in line
    at_failure = _csv(run_copy)
    assert at_failure.startswith(before)  # appended to (perhaps a torn last line), never cut
    assert _read(_ckpt(run_copy)) == last_before
    assert not [f for f in os.listdir(os.path.dirname(_ckpt(run_copy))) if f.endswith(".tmp")]
    assert main([*TINY, "--steps", "52", "--ckpt-every", "24", "--out", str(run_copy), "--resume"]) == 0
    _assert_resumed_without_loss(run_copy, at_failure, 52)  # rows past step 40 recomputed bit for bit


def test_first_checkpoint_failing_keeps_the_rows_aside(tmp_path):
    # no checkpoint was ever written: --resume starts from step 0 and keeps the old rows as scalars.csv.old
    out = tmp_path / "out"
    proc = _subprocess(_cli("--steps", "12", "--ckpt-every", "8", "--out", str(out)), tmp_path, fsize=3000)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert "last.pt" in line and "no checkpoint had been written yet" in line
    before = _csv(out)
    assert len(_complete_rows(before)) == 1 + 8 and not os.path.exists(_ckpt(out))
    assert main([*TINY, "--steps", "12", "--ckpt-every", "8", "--out", str(out), "--resume"]) == 0
    assert _read(os.path.join(_run_dir(out), "scalars.csv.old")) == before
    _assert_resumed_without_loss(out, before, 12)  # and recomputed bit for bit


# --------------------------------------------------------------------------- read-only folders
def _read_only_command(folder, args):
    """``args`` run with ``folder`` read-only: a read-only bind mount for root (who ignores
    permissions), else chmod; None where neither is possible here."""
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        return args
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-m", "true"], capture_output=True).returncode != 0:
        return None
    d = shlex.quote(folder)
    return ["unshare", "-m", "sh", "-c",
            f"mount --bind {d} {d} && mount -o remount,ro,bind {d} {d} && exec {shlex.join(args)}"]


@pytest.mark.parametrize("where", ["out", "run"])
def test_read_only_folder_exits_2_and_keeps_the_run(run_copy, tmp_path, where):
    folder = str(run_copy) if where == "out" else _run_dir(run_copy)
    before, last_before = _csv(run_copy), _read(_ckpt(run_copy))
    command = _read_only_command(folder, _cli("--steps", "48", "--out", str(run_copy), "--resume"))
    if command is None:
        pytest.skip("cannot make a read-only folder here (root without unshare)")
    try:
        proc = _subprocess(command, tmp_path)
    finally:
        os.chmod(folder, 0o755)
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert ("--out" in line and "read-only" in line) if where == "out" else "config.yaml" in line
    assert _csv(run_copy) == before and _read(_ckpt(run_copy)) == last_before
    assert main([*TINY, "--steps", "44", "--out", str(run_copy), "--resume"]) == 0
    _assert_resumed_without_loss(run_copy, before, 44)


# --------------------------------------------------------------------------- signals
def _wait_for(predicate, proc, what, timeout=TIMEOUT):
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"fdsm-train ended before {what}: {proc.communicate()[1]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 143)],
                         ids=["kill-9", "SIGINT"])
def test_signal_mid_step(tmp_path, sig, code):
    # (SIGTERM: tests/test_trainers.py::test_sigterm_writes_checkpoint_then_resume_finishes)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("--steps", "100000", "--ckpt-every", "10", "--out", str(out)), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    csv = os.path.join(_run_dir(out), "scalars.csv")
    _wait_for(lambda: os.path.isfile(csv) and len(_complete_rows(_read(csv))) > 25, proc, "25 steps")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code, err
    before = _csv(out)
    step = read_checkpoint(_ckpt(out))["step"]
    if sig != signal.SIGKILL:
        assert f"{sig.name} at step {step}" in _one_line(err)
    last_row = int(_complete_rows(before)[-1].split(b",")[0])
    assert last_row >= step >= 20
    assert main([*TINY, "--steps", str(last_row + 2), "--ckpt-every", "10", "--out", str(out), "--resume"]) == 0
    _assert_resumed_without_loss(out, before, last_row + 2)


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 143)],
                         ids=["kill-9", "SIGINT"])
def test_signal_mid_evaluation(tmp_path, capsys, sig, code):
    # one checkpoint, at the end: once it exists the process is evaluating (1200 Langevin steps x 3
    # levels), or about to (a signal before the trainer hands SIGINT back also stops it with 143)
    out = tmp_path / "out"
    args = ["--steps", "6", "--ckpt-every", "1000", "--langevin-steps", "1200", "--out", str(out)]
    proc = subprocess.Popen(_cli(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: os.path.isfile(_ckpt(out)), proc, "the final checkpoint")
    time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == code, err
    if sig != signal.SIGKILL:
        line = _one_line(err)
        assert "SIGINT" in line and "--resume" in line
    assert not os.path.exists(os.path.join(_run_dir(out), "metrics.json"))
    before = _csv(out)
    assert read_checkpoint(_ckpt(out))["step"] == 6 and len(_complete_rows(before)) == 7
    assert main([*TINY, *args, "--resume"]) == 0  # evaluates the finished run
    assert _csv(out) == before
    assert os.path.isfile(os.path.join(_run_dir(out), "metrics.json"))


def test_sigint_in_evaluation_exits_143_in_one_line(tmp_path, monkeypatch, capsys):
    # deterministic twin of the subprocess test: the signal arrives inside the experiment's evaluation
    def interrupted_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGINT did not stop the evaluation")

    monkeypatch.setattr(toy, "evaluate", interrupted_evaluate)
    out = tmp_path / "out"
    assert main([*TINY, "--steps", "4", "--out", str(out)]) == 143
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("fdsm-train: SIGINT outside the training loop") and "--resume" in line
    assert read_checkpoint(_ckpt(out))["step"] == 4
    assert not os.path.exists(os.path.join(_run_dir(out), "metrics.json"))
    before = _csv(out)
    monkeypatch.undo()
    assert main([*TINY, "--steps", "4", "--out", str(out), "--resume"]) == 0
    assert os.path.isfile(os.path.join(_run_dir(out), "metrics.json")) and _csv(out) == before


# --------------------------------------------------------------------------- bad flags outside the loop
def _flag_cases(tmp_path):
    (tmp_path / "bad.yaml").write_text("steps: [1\n")
    (tmp_path / "a_file").write_text("")
    cases = [(["--config", str(tmp_path / "bad.yaml")], "--config"), (["--out", str(tmp_path / "a_file")], "--out"),
             (["--out", str(tmp_path / "a_file" / "sub")], "--out"), (["--device", "gpu7"], "--device")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device"))
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        cases.append((["--backend", "triton"], "--backend"))
    return cases


def test_bad_flags_exit_2_with_one_line_and_make_nothing(tmp_path, capsys):
    for args, flag in _flag_cases(tmp_path):
        out = tmp_path / "never"
        rc = main([*TINY, "--out", str(out), *args])
        line = _one_line(capsys.readouterr().err)
        assert rc == 2 and flag in line, (args, line)
        assert not out.exists(), args  # no half-made run folder


def test_resume_past_the_checkpoint_steps_or_with_another_config_exits_2(run_copy, capsys):
    before = _csv(run_copy)
    rc, err = _resume(run_copy, BASE_STEPS - 1, capsys)
    assert rc == 2 and "pass --steps 40 or more" in _one_line(err)
    rc, err = _resume(run_copy, BASE_STEPS, capsys, "--lr", "0.5")
    assert rc == 2 and "different configuration (lr" in _one_line(err)
    assert _csv(run_copy) == before


def test_resume_with_other_threads_says_it_is_not_bitwise(run_copy, capsys):
    before = _csv(run_copy)
    rc, err = _resume(run_copy, BASE_STEPS + 2, capsys, "--threads", "2")
    assert rc == 0
    assert "threads 2 (checkpoint: 1)" in err and "no longer bit-identical" in err
    rows = _complete_rows(_csv(run_copy))
    assert rows[:len(_complete_rows(before))] == _complete_rows(before) and len(rows) == 1 + BASE_STEPS + 2


# --------------------------------------------------------------------------- non-finite FD loss
def test_diverging_fd_loss_stops_with_loss_is_nan_at_step(tmp_path):
    # fd_ssm_loss refuses non-finite model outputs with FloatingPointError; the trainer stops as for
    # any non-finite loss, with one line (it was a traceback)
    cfg = toy.Config(steps=10, batch_size=16, ckpt_every=2, log_every=1, threads=1)
    seed_everything(0)
    net, calls = MLPLogDensity(2, 8, 1), []

    def diverging(x):
        out = net(x)
        return out * float("inf") if len(calls) >= 5 else out

    def loss_fn(model, x, generator):
        calls.append(1)
        return score_matching_loss("fd_ssm", diverging, x, cfg, generator)

    with pytest.raises(FloatingPointError):
        score_matching_loss("fd_ssm", lambda x: net(x) * float("inf"), sample_toy("mog", 4, 0), cfg)
    trainer = Trainer(cfg, net, sample_toy("mog", 64, 0), loss_fn, str(tmp_path), progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    message = str(info.value)
    assert "\n" not in message and "loss fd_ssm is nan at step 5;" in message and "(step 4)" in message
    assert read_checkpoint(tmp_path / "checkpoints" / "last.pt")["step"] == 4
