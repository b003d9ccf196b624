"""The NCSN experiment (fdsm-train ncsn): NCSNv2 network, image data, FID arithmetic, and the trainer contract.

Smoke run per loss, exact resume, NaN stop, SIGTERM, DDP (gloo), clear configuration errors; the
network's shapes and noise conditioning; the offline image set and the dataset-path errors; FID
against an independent computation (scipy.linalg.sqrtm). Needs ``pip install ./python``.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("fdsm_train", reason="install the trainers: pip install ./python")

import fdsm_ext  # noqa: E402
from fdsm_train import distributed  # noqa: E402
from fdsm_train.checkpoint import read_checkpoint  # noqa: E402
from fdsm_train.cli import main  # noqa: E402
from fdsm_train.config import ConfigError  # noqa: E402
from fdsm_train.data.image_datasets import (  # noqa: E402
    load_images,
    procedural_shapes,
    random_hflip,
    to_unit_interval,
)
from fdsm_train.experiments import ncsn  # noqa: E402
from fdsm_train.models.ncsnv2 import (  # noqa: E402
    PRESETS,
    InstanceNormPlus,
    RefineNetConfig,
    RefineNetScore,
    ncsnv2_score_model,
)
from fdsm_train.objectives import SCORE_LOSSES  # noqa: E402
from fdsm_train.scalars import read_scalars  # noqa: E402

# the smoke settings cut further: these tests check plumbing, not sample quality
FAST = ["--smoke", "--no-progress", "--n-grid", "4", "--sample-batch", "4", "--n-steps-each", "1"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny networks' convolutions do not pay for intra-op threads; on a shared CPU they cost up to 10x."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _metrics(path):
    with open(path) as fh:
        return json.load(fh)


# =========================================================================== the network
def test_presets_shapes_and_sizes():
    tiny = ncsnv2_score_model("tiny")
    n_tiny = sum(p.numel() for p in tiny.parameters())
    assert 1000 < n_tiny < 10000
    for size in (16, 8):
        x = torch.rand(3, 3, size, size)
        assert tiny(x, torch.full((3,), 0.5)).shape == x.shape
    # the published CIFAR-10 network: 29.7M parameters (NCSNv2, ngf = 128)
    cifar = RefineNetScore(RefineNetConfig(**PRESETS["cifar10"]))
    assert sum(p.numel() for p in cifar.parameters()) == 29_694_083
    with torch.no_grad():
        assert cifar(torch.rand(1, 3, 32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kw, shape", [
    (dict(channels=1, ngf=4, widths=(1, 2, 2), dilations=(1, 1, 2), downsample=(False, True, False)), (2, 1, 28, 28)),
    (dict(ngf=3, widths=(1, 2, 2), dilations=(1, 1, 1), downsample=(False, True, True), norm="instancenorm++",
          pool="avg"), (2, 3, 12, 10)),
    (dict(ngf=4, widths=(1,), dilations=(1,), downsample=(False,), norm="none"), (2, 3, 5, 5)),
])
def test_layouts_keep_the_input_shape(kw, shape):
    net = RefineNetScore(**kw)
    x = torch.rand(shape)
    assert net(x).shape == x.shape


def test_noise_conditioning_divides_by_sigma_per_sample():
    model = ncsnv2_score_model("tiny").double()
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 1.0, 50.0], dtype=torch.float64)
    out = model(x, sigma)
    torch.testing.assert_close(out, model.net(x) / sigma[:, None, None, None], rtol=0, atol=0)
    # each sample depends only on its own sigma and image (no mixing across the batch)
    torch.testing.assert_close(model(x[2:3], sigma[2:3]), out[2:3], rtol=1e-12, atol=1e-12)


def test_instance_norm_plus_formula():
    torch.manual_seed(1)
    norm = InstanceNormPlus(5).double()
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64) * 3 + torch.arange(5.0, dtype=torch.float64)[:, None, None]
    mu = x.mean((2, 3))
    s = x.var((2, 3), unbiased=False)
    m, v = mu.mean(1, keepdim=True), mu.var(1, unbiased=False, keepdim=True)
    h = (x - mu[..., None, None]) / torch.sqrt(s[..., None, None] + norm.eps)
    h = h + (norm.alpha * (mu - m) / torch.sqrt(v + norm.eps))[..., None, None]
    expected = norm.gamma[:, None, None] * h + norm.beta[:, None, None]
    torch.testing.assert_close(norm(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kw, message", [
    (dict(widths=(1, 2), dilations=(1,), downsample=(False, True)), "one entry per stage"),
    (dict(widths=(1,), dilations=(1,), downsample=(True,)), "downsample[0]"),
    (dict(norm="batch"), "`norm` must be one of"),
    (dict(ngf=0), "`ngf` must be an integer >= 1"),
])
def test_bad_network_config(kw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RefineNetScore(**kw)


def test_too_small_images_are_refused():
    with pytest.raises(ValueError, match="at least 2x2"):
        ncsnv2_score_model("tiny")(torch.rand(1, 3, 1, 1), torch.ones(1))
    with pytest.raises(ValueError, match="unknown network preset"):
        ncsnv2_score_model("huge")


# =========================================================================== data
def test_procedural_shapes_are_seeded_uint8_images():
    a, b = procedural_shapes(32, seed=3), procedural_shapes(32, seed=3)
    assert a.dtype == torch.uint8 and a.shape == (32, 3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, procedural_shapes(32, seed=4))
    x = to_unit_interval(a)
    assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1 and float(x.std()) > 0.1
    assert load_images("shapes", split="train", shapes_count=8).shape == (8, 3, 16, 16)
    assert not torch.equal(load_images("shapes", split="test", shapes_count=8), load_images("shapes", shapes_count=8))


def test_random_hflip_uses_the_generator():
    x = torch.arange(2 * 1 * 2 * 3, dtype=torch.float32).reshape(2, 1, 2, 3).repeat(50, 1, 1, 1)
    out1 = random_hflip(x, torch.Generator().manual_seed(0))
    out2 = random_hflip(x, torch.Generator().manual_seed(0))
    assert torch.equal(out1, out2)
    flipped = (out1 != x).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < x.shape[0]
    torch.testing.assert_close(out1[flipped], x[flipped].flip(-1))


def test_missing_dataset_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cifar-10-batches-py" / "data_batch_1")):
        load_images("cifar10", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "train_32x32.mat")):
        load_images("svhn", str(tmp_path))
    with pytest.raises(ValueError, match="give its directory"):
        load_images("mnist")


def test_cifar10_read_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # what a torchvision that cannot import looks like
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 3072), dtype=np.uint8) for _ in range(5)]
    for i, data in enumerate(batches, start=1):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": data, "labels": [0] * 4}, fh)
    images = load_images("cifar10", str(tmp_path))
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[4].reshape(-1), torch.from_numpy(batches[1][0]))
    # datasets that need torchvision say so
    (tmp_path / "train_32x32.mat").write_bytes(b"")
    with pytest.raises(ImportError, match="torchvision"):
        load_images("svhn", str(tmp_path))


# =========================================================================== FID
def _fid_scipy(a: np.ndarray, b: np.ndarray) -> float:
    import scipy.linalg

    m1, m2 = a.mean(0), b.mean(0)
    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


def test_fid_arithmetic_matches_scipy():
    pytest.importorskip("scipy")
    from fdsm_train.fid import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 12, generator=g, dtype=torch.float64)
    b = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g,
                                                                            dtype=torch.float64) * 0.7 + 0.3
    expected = _fid_scipy(a.numpy(), b.numpy())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure mean shift: FID = |shift|^2
    assert frechet_distance(a, a + 0.5) == pytest.approx(12 * 0.25, rel=1e-8)


def test_fid_meter_with_a_random_extractor_is_batch_invariant():
    from fdsm_train.fid import FeatureExtractor, FIDMeter

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.ELU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    real, fake = torch.rand(30, 3, 16, 16), torch.rand(25, 1, 16, 16) * 0.8
    values = []
    for batch in (7, 100):
        meter = FIDMeter(FeatureExtractor(net, 6, uint8_input=False), batch_size=batch)
        meter.add_real(real)
        meter.add_fake(fake)
        values.append(meter.compute())
    assert values[0] == pytest.approx(values[1], rel=1e-9) and values[0] > 0


def test_inception_file_is_loaded_from_a_path_and_missing_paths_are_named(tmp_path):
    import warnings

    from fdsm_train.fid import FeatureExtractor, load_inception

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_inception(tmp_path / "nope.pt")

    class Fake(torch.nn.Module):  # the published file's interface: uint8 in, return_features -> (N, 2048)
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2048)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8
            return self.proj(x.float().mean((2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Fake()).save(str(tmp_path / "inception.pt"))
    extractor = FeatureExtractor.from_path(tmp_path / "inception.pt")
    assert extractor(torch.rand(5, 3, 8, 8)).shape == (5, 2048)


# =========================================================================== the experiment
def test_recipes_resolve_to_the_published_settings():
    cfg = ncsn.Config(recipe="ncsnv2_cifar10")
    s = ncsn.noise_schedule(cfg)
    assert (s["sigma_max"], s["n_levels"], s["n_steps_each"], s["step_lr"]) == (50.0, 232, 5, 6.2e-6)
    assert s["sigmas"][0] == 50.0 and s["sigmas"][-1] == 0.01 and s["sigmas"].shape == (232,)

    s = ncsn.noise_schedule(ncsn.Config(recipe="fd_paper"))
    torch.testing.assert_close(s["sigmas"], torch.logspace(0, -2, 10, dtype=torch.float64))
    assert (s["n_steps_each"], s["step_lr"]) == (100, 2e-5)

    # ncsnv2 on CIFAR-shaped data with sigma_1 given: T2's ratio for D = 3072, T4's step for the ladder
    images = torch.zeros(2, 3, 32, 32)
    s = ncsn.noise_schedule(ncsn.Config(recipe="ncsnv2", sigma_max=50.0), images)
    assert s["gamma_t2"] == pytest.approx(fdsm_ext.geometric_ratio(3072))
    assert s["gamma"] <= s["gamma_t2"] and s["n_levels"] == len(s["sigmas"])
    assert s["step_lr"] == pytest.approx(fdsm_ext.solve_step_size(0.01, s["gamma"], 5))
    # T1: the largest distance between two training images
    images[1] = 1.0
    s = ncsn.noise_schedule(ncsn.Config(recipe="ncsnv2"), images)
    assert s["sigma_max"] == pytest.approx(3072 ** 0.5)
    assert s["source"]["sigma_max"].startswith("T1")


@pytest.mark.parametrize("loss", SCORE_LOSSES)
def test_smoke_run_per_loss(tmp_path, loss):
    assert main(["ncsn", *FAST, "--steps", "6", "--loss", loss, "--out", str(tmp_path)]) == 0
    run = tmp_path / "shapes" / loss
    m = _metrics(run / "metrics.json")
    assert m["steps"] == 6 and m["loss"] == loss and m["n_levels"] == 10
    assert [s for s, _ in m["loss_curve"]] == [2, 4, 6]
    assert all(np.isfinite(v) for _, v in m["loss_curve"])
    assert m["sampling_seconds"] > 0 and m["fid"] is None and m["seconds_per_step"] > 0
    for name in ("samples.png", "samples_no_denoise.png", "ncsn.png", "scalars.csv", "config.yaml",
                 "checkpoints/last.pt"):
        assert (run / name).is_file(), name
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "ncsn.png").is_file()


def test_resume_matches_uninterrupted_run_bitwise(tmp_path):
    common = ["ncsn", *FAST, "--loss", "fd_ssm_vr", "--log-every", "1", "--ckpt-every", "3"]
    assert main([*common, "--steps", "6", "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--steps", "3", "--out", str(tmp_path / "split")]) == 0
    assert main([*common, "--steps", "6", "--out", str(tmp_path / "split"), "--resume"]) == 0
    full, split = tmp_path / "full" / "shapes" / "fd_ssm_vr", tmp_path / "split" / "shapes" / "fd_ssm_vr"
    a = read_scalars(str(full / "scalars.csv"), "train/loss")
    b = read_scalars(str(split / "scalars.csv"), "train/loss")
    assert len(a) == 6 and a == b
    ca, cb = read_checkpoint(full / "checkpoints" / "last.pt"), read_checkpoint(split / "checkpoints" / "last.pt")
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for key in ca["ema"]:
        assert torch.equal(ca["ema"][key], cb["ema"][key]), key
    assert _metrics(full / "metrics.json")["loss_curve"] == _metrics(split / "metrics.json")["loss_curve"]


def _loss_hook(monkeypatch, at_call: int, action):
    real = ncsn.noise_conditional_loss
    calls = []

    def patched(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return action(loss) if len(calls) == at_call else loss

    monkeypatch.setattr(ncsn, "noise_conditional_loss", patched)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    _loss_hook(monkeypatch, 5, lambda loss: loss * float("nan"))
    assert main(["ncsn", *FAST, "--steps", "8", "--ckpt-every", "2", "--out", str(tmp_path)]) == 1
    assert "is nan at step 5" in capsys.readouterr().err
    assert read_checkpoint(tmp_path / "shapes" / "fd_ssm_vr" / "checkpoints" / "last.pt")["step"] == 4
    assert not (tmp_path / "shapes" / "fd_ssm_vr" / "metrics.json").exists()


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, monkeypatch, capsys):
    def term(loss):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss

    _loss_hook(monkeypatch, 3, term)
    args = ["ncsn", *FAST, "--steps", "6", "--ckpt-every", "100", "--out", str(tmp_path)]
    assert main(args) == 143
    assert "SIGTERM at step 3" in capsys.readouterr().err
    assert read_checkpoint(tmp_path / "shapes" / "fd_ssm_vr" / "checkpoints" / "last.pt")["step"] == 3
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    assert _metrics(tmp_path / "shapes" / "fd_ssm_vr" / "metrics.json")["steps"] == 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    code = main(["ncsn", *FAST, "--steps", "4", "--loss", "dsm", "--device", "cpu", "--out", out_dir])
    if code != 0:
        raise SystemExit(f"rank {rank}: exit status {code}")


def test_ddp_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ckpt = read_checkpoint(tmp_path / "shapes" / "dsm" / "checkpoints" / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    m = _metrics(tmp_path / "shapes" / "dsm" / "metrics.json")
    assert m["steps"] == 4 and len(m["loss_curve"]) == 2
    assert distributed.setup("cpu").world_size == 1  # the parent process stayed single


@pytest.mark.parametrize("args, message", [
    (["--loss", "fd_ssm"], "unknown loss 'fd_ssm'"),
    (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
    (["--dataset", "cifar10"], "give its directory with --data-root"),
    (["--dataset", "cifar10", "--data-root", "/nonexistent/d"], "/nonexistent/d/cifar-10-batches-py/data_batch_1"),
    (["--inception", "/nonexistent/inception.pt"], "'/nonexistent/inception.pt'"),
    (["--net", "huge"], "unknown net 'huge'"),
    (["--recipe", "ncsnv3"], "unknown recipe 'ncsnv3'"),
    (["--sigma-max", "0.005"], "need sigma_max > sigma_min"),
    (["--n-levels", "1"], "--n-levels must be >= 2"),
    (["--denoise", "maybe"], "unknown denoise 'maybe'"),
    (["--batch-size", "1024"], "larger than the training set"),
    (["--image-size", "1", "--net", "cifar10"], "`size` must be an integer >= 4"),
    (["--sampler", "ddim"], "unknown sampler 'ddim' in --sampler"),
    (["--sampler", "pc,pc"], "--sampler 'pc,pc' names a sampler twice"),
    (["--sampler", "ald,"], "unknown sampler '' in --sampler 'ald,'"),
    (["--pc-snr", "0"], "--pc-snr must be a finite number > 0"),
    (["--pc-snr", "nan"], "--pc-snr must be a finite number > 0"),
    (["--pc-snr", "abc"], "--pc-snr"),
    (["--pc-corrector", "-1"], "--pc-corrector must be an integer >= 0"),
    (["--bpd-samples", "-1"], "--bpd-samples must be an integer >= 0"),
    (["--bpd-probes", "1"], "--bpd-probes must be an integer >= 2"),
    (["--bpd-divergence", "sliced"], "unknown bpd_divergence 'sliced'"),
    (["--bpd-rtol", "0"], "--bpd-rtol must be a finite number > 0"),
    (["--bpd-atol", "inf"], "--bpd-atol must be a finite number > 0"),
])
def test_bad_config_is_a_clear_error(tmp_path, capsys, args, message):
    assert main(["ncsn", *FAST, *args, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.json").exists()


def _fake_inception(path) -> str:
    """A TorchScript stand-in for the FID Inception at ``path``: 2048 features from the channel means."""
    import warnings

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(3, 2048)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.tanh(self.proj(x.float().mean((2, 3)) / 255.0))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(Fake()).save(str(path))
    return str(path)


def test_fid_with_inception_file_end_to_end(tmp_path):
    _fake_inception(tmp_path / "inception.pt")
    out = tmp_path / "out"
    assert main(["ncsn", *FAST, "--steps", "2", "--loss", "dsm", "--fid-samples", "8", "--denoise", "on",
                 "--inception", str(tmp_path / "inception.pt"), "--out", str(out)]) == 0
    m = _metrics(out / "shapes" / "dsm" / "metrics.json")
    assert np.isfinite(m["fid"]) and m["fid_samples"] == 8 and m["fid_real_images"] == 8 and m["fid_denoised"]
    assert not (out / "shapes" / "dsm" / "samples_no_denoise.png").exists()


def test_config_errors_are_config_errors():
    with pytest.raises(ConfigError, match="unknown recipe"):
        ncsn.Config(recipe="x").validate()


# =========================================================================== samplers (issue 17)
@pytest.mark.parametrize("sampler", ["pc", "all"])
def test_smoke_run_per_sampler_writes_each_samplers_grids(tmp_path, sampler):
    assert main(["ncsn", *FAST, "--steps", "2", "--loss", "dsm", "--sampler", sampler, "--out", str(tmp_path)]) == 0
    run = tmp_path / "shapes" / "dsm"
    m = _metrics(run / "metrics.json")
    assert m["samplers"] == (["pc"] if sampler == "pc" else ["ald", "pc"])
    assert all(np.isfinite(v) for _, v in m["loss_curve"])
    assert m["sampling_seconds_pc"] > 0 and m["sampling_seconds_pc_no_denoise"] > 0 and m["fid_pc"] is None
    assert m["sampling_seconds_per_image_pc"] == pytest.approx(m["sampling_seconds_pc"] / 4)
    for name in ("samples_pc.png", "samples_pc_no_denoise.png"):
        assert (run / name).is_file(), name
    ald = sampler == "all"  # annealed Langevin's files and metrics keep their names, and only when asked for
    assert (run / "samples.png").is_file() == ald and (run / "samples_no_denoise.png").is_file() == ald
    assert ("sampling_seconds" in m) == ald and ("fid" in m) == ald
    if ald:
        assert m["sampling_seconds"] > 0 and m["fid"] is None


def test_pc_sampling_is_fdsm_ext_pc_sampler_with_the_flags_settings():
    """The trainer's pc chains are ``fdsm_ext.pc_sampler`` from ``sigma_1 z`` with --pc-corrector and
    --pc-snr passed through (a different snr moves the samples, so a dropped flag fails)."""
    sigmas = fdsm_ext.geometric_sigmas(1.0, 0.01, 4)
    schedule = {"sigmas": sigmas, "n_steps_each": 1, "step_lr": 1e-3}

    def score(x, sigma):  # the N(0.5, 0.1^2 I) data's score, perturbed by N(0, sigma^2 I)
        return (0.5 - x) / (0.01 + sigma.view(-1, 1, 1, 1) ** 2)

    cfg = ncsn.Config(sample_batch=3, pc_corrector=2, pc_snr=0.3)
    got = ncsn.sample(score, 3, (1, 4, 4), schedule, cfg, "cpu", denoise=True, seed=7, sampler="pc")
    gen = torch.Generator().manual_seed(7)
    x0 = 1.0 * torch.randn(3, 1, 4, 4, generator=gen)
    want = fdsm_ext.pc_sampler(score, x0, sigmas.tolist(), n_corrector=2, snr=0.3, denoise=True, generator=gen)
    assert torch.equal(got, want)
    other = ncsn.sample(score, 3, (1, 4, 4), schedule, ncsn.Config(sample_batch=3, pc_corrector=2, pc_snr=0.1),
                        "cpu", denoise=True, seed=7, sampler="pc")
    assert not torch.equal(got, other)


def test_fid_per_sampler_with_inception_file(tmp_path):
    inception = _fake_inception(tmp_path / "inception.pt")
    out = tmp_path / "out"
    assert main(["ncsn", *FAST, "--steps", "2", "--loss", "dsm", "--fid-samples", "8", "--denoise", "on",
                 "--sampler", "ald,pc", "--inception", inception, "--out", str(out)]) == 0
    m = _metrics(out / "shapes" / "dsm" / "metrics.json")
    assert np.isfinite(m["fid"]) and np.isfinite(m["fid_pc"]) and m["fid"] != m["fid_pc"]
    assert m["fid_samples_pc"] == 8 and m["fid_real_images_pc"] == 8 and m["fid_sampling_seconds_pc"] > 0


def test_sampler_list_parsing():
    assert ncsn.samplers(ncsn.Config()) == ("ald",)
    assert ncsn.samplers(ncsn.Config(sampler="pc, ald")) == ("pc", "ald")
    assert ncsn.samplers(ncsn.Config(sampler="all")) == ncsn.SAMPLERS
    assert ncsn.samplers(ncsn.Config(sampler=["ald", "pc"])) == ("ald", "pc")  # a Config built in code


# =========================================================================== test bits/dim (issue 17)
def test_smoke_run_reports_test_bits_per_dim(tmp_path):
    assert main(["ncsn", *FAST, "--steps", "2", "--loss", "dsm", "--denoise", "on", "--bpd-samples", "2",
                 "--bpd-rtol", "1e-2", "--bpd-atol", "1e-2", "--out", str(tmp_path)]) == 0
    m = _metrics(tmp_path / "shapes" / "dsm" / "metrics.json")
    assert np.isfinite(m["test_bpd"]) and m["test_bpd"] > 0
    assert np.isfinite(m["test_bpd_se"]) and m["test_bpd_se"] > 0  # two probes: a standard error exists
    assert m["bpd_images"] == 2 and m["bpd_divergence"] == "fd" and m["bpd_probes"] == 2 and m["test_bpd_nfe"] > 0


class _MixingScore(torch.nn.Module):
    """A smooth stand-in score whose Jacobian has off-diagonal terms (``x.flip(-1)`` pairs unequal pixels),
    so the probes' estimate of its divergence has a nonzero spread (for a diagonal Jacobian Rademacher
    probes are exact)."""

    def forward(self, x, sigma):
        var = 0.04 + sigma.view(-1, 1, 1, 1) ** 2
        return (0.5 - x) / var + 0.3 * torch.tanh(x.flip(-1)) / var.sqrt()


@pytest.mark.parametrize("divergence", ["fd", "hutchinson", "exact"])
def test_bits_per_dim_is_ode_likelihood_on_the_ladder(divergence):
    """bpd_metrics is fdsm_ext.ode_likelihood from the ladder's last sigma to its first, uniformly
    dequantised on [0, 1], batch by batch; its standard error is the probes' error of the mean."""
    cfg = ncsn.Config(bpd_samples=3, sample_batch=2, bpd_divergence=divergence, bpd_rtol=1e-3, bpd_atol=1e-3)
    sigmas = fdsm_ext.geometric_sigmas(2.0, 0.05, 5)
    images = torch.randint(0, 256, (4, 1, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    m = ncsn.bpd_metrics(cfg, _MixingScore(), images, {"sigmas": sigmas}, "cpu")
    gen = torch.Generator().manual_seed(cfg.seed + ncsn.BPD_SEED_OFFSET)
    n_probes = 1 if divergence == "exact" else 2
    res = [fdsm_ext.ode_likelihood(_MixingScore(), batch, 0.05, 2.0, divergence=divergence, n_probes=n_probes,
                                   rtol=1e-3, atol=1e-3, dequantize="uniform", generator=gen)
           for batch in (images[:3].float() / 255).split(2)]
    bpd = torch.cat([r.bpd for r in res]).double()
    se = torch.cat([r.bpd_se for r in res]).double()
    assert m["bpd_images"] == 3 and m["test_bpd_nfe"] == sum(r.nfe for r in res)
    assert m["test_bpd"] == pytest.approx(float(bpd.mean()), rel=1e-12)
    assert m["test_bpd_se"] == pytest.approx(float(se.square().sum().sqrt() / 3), rel=1e-12)
    assert m["test_bpd_image_se"] == pytest.approx(float(bpd.std() / 3 ** 0.5), rel=1e-12)
    assert (m["test_bpd_se"] == 0) == (divergence == "exact")


def test_a_non_finite_score_on_the_ode_path_leaves_bits_per_dim_none_with_a_warning():
    class Blows(torch.nn.Module):
        def forward(self, x, sigma):
            return torch.where(sigma.view(-1, 1, 1, 1) > 0.5, x * float("nan"), -x)

    cfg = ncsn.Config(bpd_samples=2, bpd_rtol=1e-2, bpd_atol=1e-2)
    images = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    with pytest.warns(RuntimeWarning, match="no test bits/dim"):
        m = ncsn.bpd_metrics(cfg, Blows(), images, {"sigmas": fdsm_ext.geometric_sigmas(1.0, 0.01, 3)}, "cpu")
    assert m["test_bpd"] is None and m["test_bpd_se"] is None and "NaN" in m["test_bpd_error"]
