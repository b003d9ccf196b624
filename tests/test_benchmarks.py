"""The benchmark harness (benchmarks/run.py) runs end to end on a seconds-long configuration.

No timing is asserted (benchmarks/results/ holds the numbers); this catches breakage: every suite
records measurements, the report and the JSON are written, and a model family that is not available
is skipped with its reason. Families of score networks and the Langevin entries, whose real models
and ops land on other branches, are exercised here with stand-ins.
"""

import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn

import fdsm_ext

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import bench_common
    import bench_e2e
    import run

    return bench_common, bench_e2e, run


def _score_family(bench_e2e, name, kind):
    def build(cfg, device):
        d = cfg["dim"]
        net = nn.Sequential(nn.Linear(d, 8), nn.Softplus(), nn.Linear(8, d)).to(device)
        fn = (lambda x, sigma: net(x) / sigma[:, None]) if kind == "noise_conditional_score" else net
        return bench_e2e.Built(net, fn, lambda B: torch.randn(B, d, device=device), d)

    return bench_e2e.Family(name, kind, build, lambda c: f"{name} d={c['dim']}")


def _fake_langevin_step(x, score, alpha, seed, clamp_min=None, clamp_max=None, return_norms=False):
    return x + alpha * score + math.sqrt(2 * alpha) * torch.randn_like(x), x.new_empty((3, 0))


def _fake_annealed_langevin(score_fn, x, sigmas, n_steps_each, step_lr, *, denoise=True):
    import bench_sampling

    return bench_sampling.eager_annealed_langevin(score_fn, x, sigmas, n_steps_each, step_lr)


def test_harness_runs_every_suite(bench, monkeypatch, tmp_path):
    bench_common, bench_e2e, run = bench

    def unavailable(cfg, device):
        raise bench_common.Skip("not built yet")

    families = {
        "score_net": _score_family(bench_e2e, "score_net", "score"),
        "ncsn_like": _score_family(bench_e2e, "ncsn_like", "noise_conditional_score"),
        "missing": bench_e2e.Family("missing", "log_density", unavailable, lambda c: "missing model"),
    }
    for name, fam in families.items():
        monkeypatch.setitem(bench_e2e.FAMILIES, name, fam)
    # Use the real Langevin ops where this build has them, stand-ins otherwise.
    if not hasattr(fdsm_ext.ops, "langevin_step"):
        monkeypatch.setattr(fdsm_ext.ops, "langevin_step", _fake_langevin_step, raising=False)
    if not hasattr(fdsm_ext, "annealed_langevin"):
        monkeypatch.setattr(fdsm_ext, "annealed_langevin", _fake_annealed_langevin, raising=False)

    smoke = bench_common.SMOKE
    p = dataclasses.replace(smoke, e2e_configs={**smoke.e2e_configs, **{name: [{"dim": 3}] for name in families}})
    result = run.run_all("cpu", "smoke", out_dir=str(tmp_path), plots=False, log=lambda *a: None, preset=p)

    written = json.loads((tmp_path / "cpu_smoke.json").read_text())
    report = (tmp_path / "cpu_smoke.md").read_text()
    assert set(written["suites"]) == {"e2e", "micro", "order", "sampling"}
    for key, suite in written["suites"].items():
        assert suite["records"], key
        for rec in suite["records"]:
            assert 0 < rec["q20_s"] <= rec["median_s"] <= rec["q80_s"], (key, rec)
    e2e = result["suites"]["e2e"]["records"]
    assert {r["method"] for r in e2e if r["family"] == "mlp"} == {"fd_fused", "fd_torch", "ssm", "ssm_vr",
                                                                  "exact_sm", "dsm"}
    assert {r["method"] for r in e2e if r["family"] == "ncsn_like"} == {"fd_fused", "fd_torch", "ssm_vr", "dsm"}
    assert all(r["mem_bytes"] > 0 for r in e2e)
    assert any("missing model" in s and "not built yet" in s for s in result["suites"]["e2e"]["skipped"])
    micro_ops = {r["op"] for r in result["suites"]["micro"]["records"]}
    assert micro_ops == set(fdsm_ext.ops.FUSED_OPS)
    assert {r["bench"] for r in result["suites"]["sampling"]["records"]} == {"langevin_step", "langevin_step_full",
                                                                                   "annealed_langevin"}
    for heading in ("## Goals", "## End to end", "## Micro-benchmarks", "## Order scaling", "## Sampling"):
        assert heading in report


def test_results_table_rows_from_metrics(monkeypatch, tmp_path):
    """benchmarks/results_table.py's table on made-up metrics: values, spread, ratio, a stopped loss."""
    monkeypatch.syspath_prepend(BENCH)
    import results_table

    def run(loss, median, **metrics):
        d = tmp_path / "toy" / "mog" / loss
        d.mkdir(parents=True)
        m = {"loss": loss, "steps": 2000, "seconds_per_step": median, "seconds_per_step_q20": median * 0.9,
             "seconds_per_step_q80": median * 1.2, **metrics}
        (d / "metrics.json").write_text(json.dumps(m))

    run("fd_ssm", 0.01, heldout_exact_sm=-1.234567, mmd2=None)
    run("ssm", 0.02, heldout_exact_sm=-1.5)
    found = results_table.collect(str(tmp_path / "toy"), ["fd_ssm", "ssm", "ssm_vr"])
    assert set(found) == {"fd_ssm", "ssm"}
    header, rows = results_table.table_rows(found, ["fd_ssm", "ssm", "ssm_vr"], "ssm",
                                            {"ssm_vr": "exit 1: loss ssm_vr is nan at step 7"},
                                            ("heldout_exact_sm", "mmd2", "seconds_per_step"))
    assert header == ["loss", "steps", "heldout_exact_sm", "mmd2", "median s/step", "q20-q80", "vs ssm"]
    assert rows[0] == ["fd_ssm", "2000", "-1.235", "-", "0.01", "0.009-0.012", "0.50x"]
    assert rows[1][-1] == "1.00x"
    assert rows[2][0] == "ssm_vr" and "stopped: exit 1: loss ssm_vr is nan at step 7" in rows[2]
    table = results_table.markdown(header, rows).splitlines()
    assert table[1] == "|---|---|---|---|---|---|---|" and len(table) == 5
