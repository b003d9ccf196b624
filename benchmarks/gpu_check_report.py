"""Writes the GPU kit's report: ``OUT/<name>.md`` from the benchmark JSON (if the bench stage got that
far) plus a "GPU kit" section: each stage's outcome, the junit counts, the sanitizer's summary and
PASS/MISS per goal. Called by benchmarks/gpu_check.sh as

    printf 'stage|outcome|detail\\n...' | python benchmarks/gpu_check_report.py OUT NAME DRY(0|1)
"""

from __future__ import annotations

import json
import os
import sys
import xml.etree.ElementTree as ET

import bench_report

# The goals the GPU run is held to (issue 15), by the start of their text in bench_report.goals().
KIT_GOALS = (
    "memory-bound fused kernels ≥ 0.85×",
    "memory-bound fused kernels ≥ 1.0×",
    "memory-bound fused kernels ≥ 2×",
    "FD-SSM step ≥ 2.5× faster than SSM",
    "FD-SSM activation memory ≤ 0.6×",
    "CUDA-graph annealed sampler ≥ 2×",
)


def junit_counts(path: str) -> dict | None:
    """Totals of a pytest junit report, and how many device tests (test_cuda, tests/triton) ran unskipped."""
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": str(exc)}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    totals = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    device_ran = 0
    for case in root.iter("testcase"):
        cls = case.get("classname", "")
        if ("test_cuda" in cls or "triton" in cls) and case.find("skipped") is None:
            device_ran += 1
    return {**totals, "device_tests_run": device_ran}


def sanitizer_summary(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    keep = ("=====", "sanitizer_driver:", "ERROR SUMMARY", "RACECHECK SUMMARY", "FAIL ")
    with open(path, errors="replace") as fh:
        lines = [ln.rstrip() for ln in fh if ln.lstrip("= ").startswith(keep) or ln.startswith(keep)
                 or "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
    return lines[:40]


def kit_section(stages: list[tuple[str, str, str]], goals: list[dict], out: str, dry: bool) -> list[str]:
    lines = ["## GPU kit (benchmarks/gpu_check.sh)", ""]
    if dry:
        lines += ["**Dry run on the CPU**: the CUDA build, the GPU tests, compute-sanitizer and the GPU presets "
                  "were skipped (each says so below); the goal verdicts are of CPU smoke numbers and mean nothing "
                  "for the GPU.", ""]
    lines += ["| stage | outcome | detail |", "|---|---|---|"]
    lines += [f"| {s} | {o} | {d.replace('|', '/')} |" for s, o, d in stages] + [""]
    counts = junit_counts(os.path.join(out, "junit.xml"))
    if counts and "error" not in counts:
        lines += [f"Tests (junit.xml): {counts['tests']} collected, {counts['failures']} failed, {counts['errors']} "
                  f"errors, {counts['skipped']} skipped; device tests (test_cuda, tests/triton) that ran: "
                  f"{counts['device_tests_run']}.", ""]
    elif counts:
        lines += [f"Tests: junit.xml could not be read ({counts['error']}).", ""]
    san = sanitizer_summary(os.path.join(out, "sanitizer.log"))
    if san:
        lines += ["Sanitizer (sanitizer.log):", "", "```", *san, "```", ""]
    lines += ["| goal (issue 15) | measured | kit verdict |", "|---|---|---|"]
    for prefix in KIT_GOALS:
        g = next((g for g in goals if g["goal"].startswith(prefix)), None)
        if g is None:
            lines.append(f"| {prefix}… | not measured | MISS (not measured) |")
            continue
        verdict = "PASS" if g["verdict"] == "met" else f"MISS ({g['verdict']})"
        lines.append(f"| {g['goal']} | {g['measured']} | {verdict} |")
    return lines + [""]


def main(argv=None) -> None:
    out, name, dry = (argv or sys.argv[1:])[:3]
    dry = dry == "1"
    stages = [tuple((line.split("|", 2) + ["", ""])[:3]) for line in sys.stdin.read().splitlines() if line.strip()]
    json_path = os.path.join(out, f"{name}.json")
    if os.path.exists(json_path):
        with open(json_path) as fh:
            result = json.load(fh)
        goals = bench_report.goals(result)
        body = bench_report.markdown(result, result["command"], [])
    else:
        goals, body = [], f"# fdsm_ext GPU kit: {name}\n\nThe benchmark stage wrote no results (see bench.log).\n"
    kit = "\n".join(kit_section(stages, goals, out, dry))
    # the kit's verdicts first: they are what a short lease is for
    title, _, rest = body.partition("\n")
    with open(os.path.join(out, f"{name}.md"), "w") as fh:
        fh.write(f"{title}\n\n{kit}\n{rest.lstrip()}")
    print(kit)


if __name__ == "__main__":
    main()
