"""scripts/gpu_check.sh: the plan prints and every part runs (tiny, on CPU) with --dry-run; without
CUDA and without --dry-run it refuses in one line."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_part():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for part in ("[train]", "[decode]", "[infer]", "[speculative]", "[attention]", "[smoke]"):
        assert part in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dry_run"] is True
    assert [r["grad_ckpt"] for r in result["train"]] == [False, True] and result["train"][0]["tok_s"] > 0
    assert {r["batch"] for r in result["decode"]["rows"]} == {1, 2}
    assert all(r["rows_identical"] == f"{r['batch']}/{r['batch']}" for r in result["decode"]["rows"])
    assert {(r["quant"], r["batch"]) for r in result["infer"]["rows"]} == {(q, b) for q in ("none", "int8", "int4")
                                                                          for b in (1, 2)}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mbu"] for r in result["infer"]["rows"])
    assert result["speculative"]["identical"] is True  # fp32: speculative greedy == plain greedy
    assert set(result["attention"]["decode"]) >= {"mha", "mla"}
    assert result["smoke"]["ok"] and "done: step 3" in result["smoke"]["result"]


def test_gpu_check_without_cuda_is_one_clear_error():
    if torch.cuda.is_available():
        return
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "gpu_check: error: no CUDA device; run with --dry-run to check the plan on CPU")
