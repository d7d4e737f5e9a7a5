"""bench/gpu_step.py cannot rot: its CPU smoke run (``--device cpu --quick``) goes through every case
(eager / compiled / dense box, fp32 / bf16 autocast) with ray, deepspeed, pymatgen and ase blocked,
as on the GPU machines, and writes its table as JSON; its time budget skips cases instead of
overrunning."""

from __future__ import annotations

import json

import pytest

from test_lazy_imports import run_blocked

RUN_SCRIPT = """
    import runpy, sys
    sys.argv = ["bench/gpu_step.py", *sys.argv[1:]]
    runpy.run_path("bench/gpu_step.py", run_name="__main__")
"""


@pytest.mark.slow  # compiles the step (aot_eager) for 4 cases: ~25 s on 2 cores
def test_quick_cpu_run_covers_every_case_without_the_heavy_stack(shard_dir, tmp_path):
    out = tmp_path / "gpu_step.json"
    res = run_blocked(RUN_SCRIPT, "--shards", str(shard_dir), "--device", "cpu", "--quick",
                      "--compile-backend", "aot_eager", "--json", str(out))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    result = json.loads(out.read_text())
    cases = {(c["mode"], c["precision"], c["batch"]): c for c in result["cases"]}
    want = {(m, p, b) for b in (4, 8) for m, p in
            [("eager", "fp32"), ("eager", "bf16"), ("dense", "fp32"), ("compiled", "fp32"), ("compiled", "bf16")]}
    assert set(cases) == want
    for key, case in cases.items():
        assert case["status"] == "ok", (key, case)
        assert case["structures_per_s"] > 0 and case["steps"] == 2 and case["peak_mb"] > 0, (key, case)
        assert case["entries_per_step"] > case["atoms_per_step"] > 0
    assert result["header"]["device"].startswith("CPU") and result["header"]["compile_backend"] == "aot_eager"
    table = res.stdout
    assert "| mode | precision | structures/step | structures/s |" in table and "compiled / eager" in table
    assert table.count("| compiled | bf16 | 8 |") == 1


def test_time_budget_skips_cases_and_still_reports(shard_dir, tmp_path):
    out = tmp_path / "gpu_step.json"
    res = run_blocked(RUN_SCRIPT, "--shards", str(shard_dir), "--device", "cpu", "--quick", "--budget-s", "0",
                      "--json", str(out))
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 10 and all(c["status"].startswith("skipped (time budget") for c in cases), cases
