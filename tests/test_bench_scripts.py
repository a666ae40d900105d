"""The bench scripts run (in their dry modes) so they stay ready for a GPU machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run():
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                            text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    # the dry run of cuda_parity.py compares the CPU path with itself: it proves the script runs and reports, no more
    parity = [line for line in out.splitlines() if line.endswith("(dry run: cpu against itself)")]
    assert len(parity) == 8 and "FAIL" not in out, out  # logits, then sparsegpt, wanda and admm, per family
    assert all(re.search(r"max abs diff \d\.\d\de[-+]\d+ " if " logits " in line else
                         r"masks agree [\d.]+% \(block 0\), [\d.]+% \(all\), perplexity [\d.]+ vs [\d.]+", line)
               for line in parity), parity
    for phase in ("calibrate", "hessian", "solve", "error", "forward", "block"):
        assert f"\n{phase}" in out
    assert "extrapolated" in out
    solve_rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["sparsegpt"], ["wanda"], ["magnitude"])]
    assert len(solve_rows) == 5 and all(len(r) == 7 for r in solve_rows), out  # no case failed


def test_memory_bench_small():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "memory.py"), "--depths", "2", "4", "--hidden", "256",
                             "--ffn", "512", "--heads", "4"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [int(r[1]) for r in rows] == [2, 4]


def test_synth_headers_only_checkpoint_plans(tmp_path):
    out = tmp_path / "m"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "synth.py"), str(out), "--hidden", "256", "--ffn", "1024",
                             "--heads", "4", "--depth", "3", "--headers-only"], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(sparse)" in result.stdout
    from streamprune.plan import plan

    assert plan(out, nsamples=4, seqlen=64, device="cpu").host_peak > 0


def test_quant_size_bench_small():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "quant_size.py"), "--hidden", "256", "--ffn", "512",
                             "--heads", "4"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines() if line.split()[:1] in (["sym"], ["asym"])]
    assert len(rows) == 2 and all(float(r[3]) <= 0.3 for r in rows), result.stdout


def test_fused_experts_bench_small():
    """A per-expert and a fused copy of a small Qwen3.5-MoE prune alike, in separate processes."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "fused_experts.py"), "--experts", "8", "--hidden",
                             "128", "--ffn", "64", "--nsamples", "4", "--seqlen", "64"], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    assert re.search(r"perplexities equal; pruned tensors equal bit for bit: (\d+) of \1$", result.stdout.strip()), \
        result.stdout


def test_giants_plans_qwen_from_headers():
    """Qwen3.6-35B-A3B's exact layout (experts fused, a vision tower, an MTP layer) is planned from its headers."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "giants.py"), "--models", "Qwen3.6-35B-A3B",
                             "--nsamples", "8", "--seqlen", "512"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "%" in line]
    assert len(rows) == 4 and not any("refused" in r for r in rows), result.stdout
