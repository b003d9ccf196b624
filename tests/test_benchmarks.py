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
    assert set(written["suites"]) == {"floor", "e2e", "micro", "order", "sampling", "instructions"}
    assert written["suites"]["instructions"]["skipped"] == ["instructions: not in the smoke preset"]
    for key, suite in written["suites"].items():
        if key == "instructions":
            continue
        assert suite["records"], key
        for rec in suite["records"]:
            if key != "floor":
                assert 0 < rec["q20_s"] <= rec["median_s"] <= rec["q80_s"], (key, rec)
            if rec.get("ratio") is not None:  # every same-run comparison carries its paired ratio
                assert 0 < rec["ratio_q20"] <= rec["ratio"] <= rec["ratio_q80"], (key, rec)
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
    floor = result["suites"]["floor"]["records"]
    assert {(r["bench"], r["loss"]) for r in floor} == {(b, loss) for b in ("floor", "overhead")
                                                        for loss in ("fd_ssm", "fd_ssm_vr", "fd_dsm")}
    assert all(r["pairs"] == 3 and r["ratio"] > 0 for r in floor)
    goals = {g["goal"]: g for g in written["goals"]}
    assert any("its floor" in g and goals[g]["values"] for g in goals)
    for heading in ("## Goals", "## The floor of a loss step", "## End to end", "## Micro-benchmarks", "## Order scaling", "## Sampling"):
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


def test_compare_alternates_and_pairs_out_a_load_drift(bench, monkeypatch):
    """compare() runs A, B then B, A, ...; a load that doubles the machine's slowness every round (on a
    fake clock) changes every time but not the paired ratio, which stays the cost ratio exactly."""
    bench_common, _, _ = bench
    clock, calls = [0.0], []
    slowdown = {"value": 1.0}

    def fake_perf_counter():
        return clock[0]

    def method(name, cost):
        def fn():
            calls.append(name)
            clock[0] += cost * slowdown["value"]
        return fn

    monkeypatch.setattr(bench_common.time, "perf_counter", fake_perf_counter)
    p = dataclasses.replace(bench_common.SMOKE, warmup_s=0.0, block_s=0.0, blocks=6, max_s=1e9)
    fns = {"A": method("A", 3.0), "B": method("B", 1.0)}
    orig_block = bench_common._block

    def drifting_block(fn, inner, device):
        out = orig_block(fn, inner, device)
        slowdown["value"] *= 1.5  # the load drifts between blocks, even inside a round
        return out

    monkeypatch.setattr(bench_common, "_block", drifting_block)
    t = bench_common.compare(fns, torch.device("cpu"), p)
    timed = calls[4:]  # after 2 warm-up calls each
    assert timed == ["A", "B", "B", "A", "A", "B", "B", "A", "A", "B", "B", "A"]
    assert t["A"].q80_s / t["A"].q20_s > 5  # the times themselves swing with the load
    r = bench_common.paired_ratio(t["A"], t["B"])
    # per round the later block is 1.5x slower: A first gives 3/1.5 = 2, B first gives 3*1.5 = 4.5 (the
    # true 3 is their geometric mean); alternation makes the two equally many, so the quantiles bracket 3
    ratios = [a / b for a, b in zip(t["A"].samples_s, t["B"].samples_s)]
    assert [round(v, 9) for v in ratios] == [2.0, 4.5] * 3
    assert r["pairs"] == 6 and math.isclose(r["ratio_q20"], 2.0) and math.isclose(r["ratio_q80"], 4.5)


def test_callgrind_dumps_to_instructions_per_element(monkeypatch, tmp_path):
    """callgrind_counts parses callgrind's dump files and takes the per-element slope between sizes."""
    monkeypatch.syspath_prepend(BENCH)
    import callgrind_counts

    def dump(i, label, ir):
        (tmp_path / f"cg.out.{i}").write_text(f"version: 1\ncmd: python\ndesc: Trigger: Client Request: {label}\n"
                                              f"events: Ir\nfn=x\n1 {ir}\nsummary: {ir}\ntotals: {ir}\n")

    dump(1, "perturb|fwd|fused|100#0", 5_000)
    dump(2, "perturb|fwd|fused|100#1", 5_000)
    dump(3, "perturb|fwd|fused|1100#0", 45_000)
    dump(4, "perturb|fwd|fused|1100#1", 45_100)
    dump(5, "perturb|fwd|copy|100#0", 2_000)
    dump(6, "perturb|fwd|copy|1100#0", 3_000)
    (tmp_path / "cg.out").write_text("desc: Trigger: Program termination\ntotals: 9\n")
    counts = callgrind_counts.parse_dumps(str(tmp_path))
    assert counts["perturb|fwd|fused|1100#1"] == [45_100]
    recs = {r["variant"]: r for r in callgrind_counts.per_element(counts)}
    assert recs["fused"]["ir_per_element"] == 40.0 and recs["copy"]["ir_per_element"] == 1.0
    assert math.isclose(recs["fused"]["repeat_spread"], 100 / 45_000)
    table = "\n".join(callgrind_counts.markdown({"records": list(recs.values()), "dim": 8, "sizes": [100, 1100]}))
    assert "| perturb | fwd | 40.0 | – | – | 1.0 | – | – | 0.03× |" in table


def test_micro_cases_from_examples(monkeypatch):
    """A fused op without a hand-written micro-benchmark case is measured from its example: the fallback,
    built here for every fused op, agrees with the reference and runs forward and backward."""
    monkeypatch.syspath_prepend(BENCH)
    import bench_micro

    for op in fdsm_ext.ops.FUSED_OPS:
        case = bench_micro.case_from_example(op)(256, 16, torch.device("cpu"), True)
        assert bench_micro._check(case) < 1e-3
        assert case.fwd_bytes > 0 and case.bwd_bytes > 0
        for mode in bench_micro.MODES:
            bench_micro._runner(case.fused, case, mode, False)()
            bench_micro._runner(case.eager, case, mode, False)()


def test_sanitizer_driver_covers_every_registered_op(monkeypatch):
    """The GPU kit's sanitizer driver reaches every fdsm_ext:: operator (its cases come from the ops'
    examples), and runs a few of its cases on the CPU kernels."""
    monkeypatch.syspath_prepend(BENCH)
    import sanitizer_driver

    assert sanitizer_driver.registered_ops() <= set(sanitizer_driver.CASES)
    assert sanitizer_driver.main(["--device", "cpu", "--max-shapes", "2", "--dtypes", "float32"]) == 0


def test_gpu_check_report_verdicts(monkeypatch, tmp_path):
    """The kit's report: stage table, junit counts (device tests that ran), PASS/MISS per goal."""
    monkeypatch.syspath_prepend(BENCH)
    import gpu_check_report

    (tmp_path / "junit.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="a"/>'
        '<testcase classname="tests.triton.test_perturb" name="b"><skipped/></testcase>'
        '<testcase classname="tests.test_ops" name="c"><failure/></testcase></testsuite></testsuites>')
    goals = [{"goal": "CUDA-graph annealed sampler ≥ 2× the eager loop (small score net)", "measured": "2.40×",
              "verdict": "met"},
             {"goal": "memory-bound fused kernels ≥ 2× the eager composite", "measured": "x", "verdict": "not met"}]
    text = "\n".join(gpu_check_report.kit_section([("tests", "FAIL", "exit 1")], goals, str(tmp_path), False))
    assert "| tests | FAIL | exit 1 |" in text
    assert "3 collected, 1 failed, 0 errors, 1 skipped; device tests (test_cuda, tests/triton) that ran: 1" in text
    assert "| CUDA-graph annealed sampler ≥ 2× the eager loop (small score net) | 2.40× | PASS |" in text
    assert "| memory-bound fused kernels ≥ 2× the eager composite | x | MISS (not met) |" in text
    assert "| memory-bound fused kernels ≥ 0.85×… | not measured | MISS (not measured) |" in text
