"""The trainers' shared design and the GPU user's training options, on CPU.

- one design: config subclasses override only what differs from TrainConfig, every experiment writes
  ``<out>/<data>/<loss>/`` and ``<out>/<experiment>.png`` (a datasets x losses grid), bars name the run,
  a resume says where it resumed, ``--help`` reads as plain text with the experiment first, errors
  name the flag;
- ``--precision bf16|fp16`` (autocast of the model, a GradScaler for fp16 that checkpoints carry),
  ``--eps auto``, ``--compile`` (and its refusal for double-backward losses), channels-last for NCSN,
  and the data's trip to the device.

Needs ``pip install ./python`` (or ``-e``); skipped with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest
import torch

fdsm_train = pytest.importorskip("fdsm_train", reason="install the trainers: pip install ./python")

from fdsm_train import config as config_module  # noqa: E402
from fdsm_train import experiments  # noqa: E402
from fdsm_train.checkpoint import read_checkpoint  # noqa: E402
from fdsm_train.cli import main, plain_text  # noqa: E402
from fdsm_train.config import TrainConfig  # noqa: E402
from fdsm_train.data.toy import sample_toy  # noqa: E402
from fdsm_train.experiments import ncsn, toy  # noqa: E402
from fdsm_train.models.mlp import MLPLogDensity  # noqa: E402
from fdsm_train.objectives import LOSSES, SCORE_LOSSES, score_matching_loss  # noqa: E402
from fdsm_train.trainer import Trainer, seed_everything, to_device  # noqa: E402

QUIET = ["--no-progress"]
# the toy's smoke run shortened further: these tests check wiring, not fits
TINY_TOY = ["toy", "--smoke", "--steps", "4", "--n-samples", "64", "--langevin-steps", "2", "--grid", "16",
            "--n-test", "64"]


def _metrics(path) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _help(capsys, name: str) -> str:
    """``fdsm-train NAME --help`` with its line breaks undone (argparse wraps to the terminal's width)."""
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _settings_help(capsys, name: str) -> str:
    """The settings section of ``--help``: one entry per flag."""
    text = _help(capsys, name)
    return text[text.index("settings (defaults"):text.index("Examples:")]


# --------------------------------------------------------------------------- one design
@pytest.mark.parametrize("name", experiments.EXPERIMENTS)
def test_config_subclasses_override_only_what_differs(name):
    # a subclass re-declaring a base field with the base's own default is a second copy of that default
    cls = experiments.load(name).Config
    base = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    own = cls.__dict__.get("__annotations__", {})
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    same = [n for n in own if n in base and defaults[n] == base[n]]
    assert not same, f"{name}.Config re-declares {same} with TrainConfig's defaults"


@pytest.mark.parametrize("name", experiments.EXPERIMENTS)
def test_help_is_plain_text_with_the_experiment_first(capsys, name):
    text = _help(capsys, name)
    assert text.startswith(f"usage: fdsm-train {name} ")
    for raw in ("``", ":class:", ":func:", ":mod:", "::"):
        assert raw not in text, raw
    assert "--backend" in text and "auto, cpp, triton, torch" in text


def test_plain_text_reduces_roles_and_literals():
    assert plain_text("see :class:`~fdsm_train.config.TrainConfig` and ``toy``::\n") == "see TrainConfig and toy:\n"
    assert plain_text(":func:`fdsm_ext.auto_eps`") == "fdsm_ext.auto_eps"


def test_help_describes_only_the_losses_an_experiment_offers(capsys):
    text = _settings_help(capsys, "ncsn")
    assert "--dsm-sigma" not in text  # the annealed losses take the ladder's levels
    for name in set(LOSSES) - set(SCORE_LOSSES):
        assert not re.search(rf"\b{name}\b", text), name
    assert "--dsm-sigma" not in _settings_help(capsys, "ebm")  # each sample draws its own sigma
    assert "--dsm-sigma" in _settings_help(capsys, "toy")


def test_unused_fields_are_refused_by_name(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("dsm_sigma: 0.3\n")
    assert main(["ncsn", "--smoke", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path), *QUIET]) == 2
    assert "unknown field 'dsm_sigma' in the config file" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--steps", "ten"], "--steps must be an int, got 'ten'"),
    (["--lr", "fast"], "--lr must be a number, got 'fast'"),
    (["--eps", "tiny"], "--eps must be a number or 'auto', got 'tiny'"),
    (["--precision", "fp8"], "--precision must be one of fp32, bf16, fp16, got 'fp8'"),
    (["--backend", "cuda"], "--backend must be one of auto, cpp, triton, torch, got 'cuda'"),
    (["--compile", "--loss", "ssm"], "--compile cannot train loss 'ssm'"),
])
def test_errors_name_the_flag(tmp_path, capsys, args, message):
    assert main(["toy", "--smoke", *args, "--out", str(tmp_path), *QUIET]) == 2
    assert message in capsys.readouterr().err


def test_config_file_errors_name_the_field_and_the_file(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("steps: ten\n")
    assert main(["toy", "--smoke", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path), *QUIET]) == 2
    assert "`steps` (from the config file) must be an int, got 'ten'" in capsys.readouterr().err


def test_backend_list_offers_triton():
    assert config_module.BACKENDS == ("auto", "cpp", "triton", "torch")
    TrainConfig(backend="triton").validate()


def test_toy_sweep_figure_is_a_grid_of_densities_by_losses(tmp_path):
    from matplotlib.image import imread

    assert main([*TINY_TOY, "--loss", "fd_ssm,ssm", "--density", "mog,rings", "--out", str(tmp_path), *QUIET]) == 0
    for density in ("mog", "rings"):
        for loss in ("fd_ssm", "ssm"):
            assert (tmp_path / density / loss / "toy.png").is_file()
    height, width, _ = imread(tmp_path / "toy.png").shape
    # 2 rows (densities) x 3 columns (data, 2 losses) of square cells, not a column of 4 x 3 panels
    assert 1.2 < width / height < 1.8, (width, height)


@pytest.mark.parametrize("name, data", [("dkef", "wine"), ("nice", "digits"), ("ebm", "digits")])
def test_every_experiment_has_the_same_layout(tmp_path, name, data):
    loss = experiments.load(name).Config.allowed_losses[0]
    assert main([name, "--smoke", "--loss", loss, "--out", str(tmp_path), *QUIET]) == 0
    assert sorted(os.listdir(tmp_path)) == sorted([data, "metrics.json", f"{name}.png"])
    run = tmp_path / data / loss
    for f in ("metrics.json", f"{name}.png", "scalars.csv", "config.yaml", "checkpoints/last.pt"):
        assert (run / f).is_file(), f


def test_bars_name_the_run_and_a_resume_says_where_it_resumed(tmp_path, capsys):
    assert main([*TINY_TOY, "--steps", "3", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "mog/fd_ssm training" in err and "mog/fd_ssm evaluating" in err
    assert main([*TINY_TOY, "--steps", "5", "--out", str(tmp_path), "--resume", *QUIET]) == 0
    assert "mog/fd_ssm: resumed from step 3 of 5" in capsys.readouterr().out


# --------------------------------------------------------------------------- the training step's options
def _toy_trainer(tmp_path, record: list, **cfg_kw) -> Trainer:
    cfg = toy.Config(**{**toy.SMOKE, "steps": 3, "log_every": 1, **cfg_kw})
    cfg.validate()
    seed_everything(cfg.seed)
    model = MLPLogDensity(2, cfg.hidden, cfg.depth)

    def loss_fn(net, x, generator):
        record.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), net))
        return score_matching_loss(cfg.loss, net, x, cfg, generator)

    return Trainer(cfg, model, sample_toy("mog", 512, 0), loss_fn, str(tmp_path), progress=False)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_precision_runs_the_model_under_autocast(tmp_path, precision, dtype):
    record = []
    result = _toy_trainer(tmp_path, record, precision=precision, eps="auto").fit()
    assert all(enabled and got == dtype for enabled, got, _ in record)
    assert torch.isfinite(torch.tensor(result.final_loss))
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, not a cast of the weights


def test_fp32_runs_without_autocast(tmp_path):
    record = []
    _toy_trainer(tmp_path, record).fit()
    assert record and not any(enabled for enabled, _, _ in record)


def test_fp16_grad_scaler_state_survives_a_resume(tmp_path):
    # the scaler's growth counter counts the steps since the last overflow: a resume that lost it
    # would restart the count (and the loss scale) from scratch
    common = [*TINY_TOY, "--precision", "fp16", "--ckpt-every", "3", *QUIET]
    assert main([*common, "--steps", "6", "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--steps", "3", "--out", str(tmp_path / "split")]) == 0
    assert main([*common, "--steps", "6", "--out", str(tmp_path / "split"), "--resume"]) == 0
    full = read_checkpoint(tmp_path / "full" / "mog" / "fd_ssm" / "checkpoints" / "last.pt")["grad_scaler"]
    split = read_checkpoint(tmp_path / "split" / "mog" / "fd_ssm" / "checkpoints" / "last.pt")["grad_scaler"]
    # a resume that restarted the scaler would end with a counter of 3 (no overflow) or, if the first
    # steps overflowed at the initial scale 2^16, overflow again: another scale and counter either way
    assert "scale" in full and full["_growth_tracker"] > 0 and split == full


def test_bf16_end_to_end_with_eps_following_the_dtype(tmp_path):
    import warnings

    from fdsm_ext.numerics import FDPrecisionWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", FDPrecisionWarning)  # eps=0.1 is below what bf16 resolves
        assert main([*TINY_TOY, "--precision", "bf16", "--out", str(tmp_path), *QUIET]) == 0
    m = _metrics(tmp_path / "mog" / "fd_ssm" / "metrics.json")
    assert m["precision"] == "bf16" and m["config"]["eps"] == "auto"
    assert m["final_train_loss"] is not None and m["heldout_nll"] is not None


def test_an_explicit_eps_wins_over_the_precision_default():
    from fdsm_train.config import build_configs

    (cfg,) = build_configs(toy.Config, cli_values={"precision": "bf16", "eps": "0.2"})
    assert cfg.eps == 0.2
    (cfg,) = build_configs(toy.Config, cli_values={"precision": "fp32"})
    assert cfg.eps == 0.1


def test_compile_trains_through_the_compiled_model_and_reports_its_time(tmp_path):
    assert main([*TINY_TOY, "--compile", "--out", str(tmp_path), *QUIET]) == 0
    run = tmp_path / "mog" / "fd_ssm"
    m = _metrics(run / "metrics.json")
    assert m["compile"] is True and m["compile_seconds"] > 0
    keys = read_checkpoint(run / "checkpoints" / "last.pt")["model"].keys()
    assert not any("_orig_mod" in k for k in keys)  # checkpoints hold the module itself


def test_compile_passes_the_compiled_module_to_the_loss(tmp_path):
    record = []
    trainer = _toy_trainer(tmp_path, record, compile=True, steps=1)
    assert trainer.step_model is not trainer.model
    trainer.fit()
    assert record[0][2] is trainer.step_model


def test_ncsn_channels_last(tmp_path):
    assert not ncsn.uses_channels_last(ncsn.Config(), torch.device("cpu"))
    assert ncsn.uses_channels_last(ncsn.Config(), torch.device("cuda", 0))
    assert not ncsn.uses_channels_last(ncsn.Config(channels_last="off"), torch.device("cuda", 0))
    fast = ["--smoke", "--no-progress", "--n-grid", "4", "--sample-batch", "4", "--n-steps-each", "1"]
    assert main(["ncsn", *fast, "--steps", "2", "--loss", "dsm", "--channels-last", "on", "--out",
                 str(tmp_path)]) == 0
    m = _metrics(tmp_path / "shapes" / "dsm" / "metrics.json")
    assert m["channels_last"] is True and m["final_train_loss"] is not None


def test_to_device_on_cpu_is_the_tensor_itself():
    t = torch.arange(6)
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_device_on_cuda_copies_from_pinned_memory():
    t = torch.arange(1000, dtype=torch.float32)
    out = to_device(t, torch.device("cuda"))
    assert out.device.type == "cuda" and torch.equal(out.cpu(), t)


# --------------------------------------------------------------------------- self-check at first contact
def test_startup_selfcheck_refuses_a_disagreeing_requested_backend_and_warns_for_auto(monkeypatch, capsys):
    """The trainers self-check fdsm_ext once per device (on CUDA); exercised here on the CPU with a
    deliberately wrong cpp kernel."""
    import importlib

    import fdsm_ext
    from fdsm_train import trainer
    from fdsm_train.config import ConfigError

    sc = importlib.import_module("fdsm_ext.selfcheck")  # fdsm_ext.selfcheck is the function
    real = sc._namespace

    class Wrong:
        def __init__(self, ns):
            self.ns = ns

        def __getattr__(self, name):
            op = getattr(self.ns, name)
            return (lambda *a: op(*a) * 1.01) if name == "fd_ssm_quotient" else op

    monkeypatch.setattr(sc, "_namespace", lambda b: Wrong(real(b)) if b == "cpp" else real(b))
    monkeypatch.setattr(fdsm_ext._checks, "FAILED_BACKENDS", {})
    monkeypatch.setattr(trainer, "_SELF_CHECKED", set())
    with pytest.raises(ConfigError, match="--backend cpp: fdsm_ext's self-check on cpu found .*fd_ssm_quotient"):
        trainer.startup_selfcheck(torch.device("cpu"), "cpp")
    monkeypatch.setattr(trainer, "_SELF_CHECKED", set())
    trainer.startup_selfcheck(torch.device("cpu"), "auto")
    assert "backend(s) cpp disagreeing with the reference" in capsys.readouterr().err
    trainer.startup_selfcheck(torch.device("cpu"), "cpp")  # once per device and process: not again
