"""Several ranks (torchrun, gloo on the CPU) prune to the masks one process finds, resume after a rank is killed,
and report a rank's error once. Each run is launched as a user would: `torchrun --nproc-per-node 2 -m streamprune`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

import streamprune
from streamprune.dist import Ranks
from streamprune.report import load_report
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(*args: str, nproc: int = 2, script: tuple[str, ...] = ("-m", "streamprune"), env: dict | None = None,
             wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *script,
           *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env={**ENV, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(out.glob("*.safetensors")) for k, v in load_file(p).items()}


def checkpoint_files(out: Path) -> dict[str, bytes]:
    """Every file of the output checkpoint except the report (which holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != "streamprune_report.json"}


def test_shares_and_owners():
    assert [Ranks(r, 3).share(8) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert Ranks().share(5) == slice(0, 5) and Ranks().owners([4, 9, 1]) == [0, 0, 0]
    # largest first to the least loaded; single linears rotate with `turn`
    assert Ranks(0, 2).owners([10, 10, 10]) == [0, 1, 0]
    assert Ranks(0, 2).owners([10, 40, 10, 10]) == [1, 0, 1, 1]
    assert [Ranks(0, 2).owners([5], turn) for turn in range(3)] == [[0], [1], [0]]


def test_plan_per_rank(tmp_path):
    """`plan --nproc N`: one rank's memory, its share of the activations beside a whole block."""
    from streamprune.plan import plan

    src = tiny.build(tmp_path / "model", "llama")
    one, two = (plan(src, nsamples=16, seqlen=64, device="cpu", nproc=n) for n in (1, 2))
    acts = [dict((what, b) for what, b, _ in p.consumers)["calibration activations (input and output buffers)"]
            for p in (one, two)]
    assert acts[1] * 2 == acts[0] and two.host_peak < one.host_peak and two.nproc == 2
    with pytest.raises(streamprune.StreamPruneError, match="nproc 0"):
        plan(src, nproc=0)


PACKED = dict(wbits=4, group_size=16, format="compressed-tensors")
OWL = dict(allocation="owl", sparsity=0.7)
REMOVE = dict(prune_experts=0.5)
REMOVE_ONLY = dict(prune_experts=0.5, sparsity=0.0, sequential=False)  # nothing solved: no expert read back
CASES = [("llama", "sparsegpt", {}), ("opt", "wanda", {}), ("bloom", "sparsegpt", {}), ("mixtral", "sparsegpt", {}),
         ("mixtral", "sparsegpt", PACKED), ("llama", "wanda", OWL), ("qwen2-moe", "sparsegpt", REMOVE),
         ("deepseek-v3", "sparsegpt", REMOVE_ONLY)]
LABELS = {"wbits": "-packed", "allocation": "-owl", "prune_experts": "-remove-experts", "sequential": "-only"}


@pytest.mark.parametrize("variant,method,extra", CASES,
                         ids=[f"{v}-{m}{''.join(LABELS[k] for k in x if k in LABELS)}" for v, m, x in CASES])
def test_two_ranks_prune_like_one_process(tmp_path, calib, variant, method, extra):
    """Two ranks split the windows and the solves, yet find the masks one process finds (up to the order of float
    sums: >= 99% of each matrix's mask agrees) and a perplexity within 0.3%; --eval in the same pass agrees too.
    The packed output (4-bit compressed-tensors) goes from rank to rank as its stored parts."""
    src = tiny.build(tmp_path / "model", variant)
    args = dict(method=method, calib=calib, nsamples=8, seqlen=64, device="cpu", eval=calib, eval_nsamples=6,
                eval_seqlen=64, **extra)
    one = streamprune.prune(src, tmp_path / "one", **args)
    flags = [f"--{'' if v else 'no-'}{k.replace('_', '-')}" if isinstance(v, bool) else f"--{k.replace('_', '-')}={v}"
             for k, v in args.items()]
    run = torchrun("run", src, tmp_path / "two", *flags)
    assert run.returncode == 0, run.stdout + run.stderr
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    pruned = [lr.name for lr in one.layers] if "wbits" not in extra else []  # packed: compared by perplexity
    for name in pruned:
        agree = float(((a[name] == 0) == (b[name] == 0)).float().mean())
        assert agree >= 0.99, (name, agree)
    for name in set(a) - set(pruned) - {n for n in a if "weight_" in n}:  # copied bit for bit by rank 0
        assert torch.equal(a[name], b[name]), name
    two = load_report(tmp_path / "two")
    assert two.world_size == 2 and [r["rank"] for r in two.ranks] == [0, 1]
    assert [r["windows"] for r in two.ranks] == [4, 4] and two.args["nsamples"] == 8
    assert [lr.name for lr in two.layers] == [lr.name for lr in one.layers]
    assert two.fingerprint == one.fingerprint  # the same job: a run may resume under another world size
    if "allocation" in extra:  # OWL's dense pass: each rank's share of the column norms, summed
        assert two.block_sparsity == pytest.approx(one.block_sparsity, abs=1e-6) and len(set(two.block_sparsity)) > 1
        assert two.allocation["outlier_ratios"] == pytest.approx(one.allocation["outlier_ratios"], rel=1e-5)
    if "prune_experts" in extra:  # each expert's sums over every rank's share of the windows
        assert [b["removed"] for b in two.experts] == [b["removed"] for b in one.experts]
        for b1, b2 in zip(one.experts, two.experts):
            assert [e["routed_tokens"] for e in b2["experts"]] == [e["routed_tokens"] for e in b1["experts"]]
            assert [e["score"] for e in b2["experts"]] == pytest.approx([e["score"] for e in b1["experts"]], rel=1e-5)
    assert two.eval["windows"] == 6 and two.perplexity == pytest.approx(one.perplexity, rel=3e-3)
    ppl = [streamprune.evaluate(out, calib, seqlen=64, nsamples=8, device="cpu").perplexity for out in
           (tmp_path / "one", tmp_path / "two")]
    assert ppl[1] == pytest.approx(ppl[0], rel=3e-3)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """An 8-block LLaMA-shaped model, large enough that a rank can be killed in the middle of a run."""
    base = tmp_path_factory.mktemp("dist")
    model, calib = tiny.deep(base, "LlamaConfig", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                             num_attention_heads=4)
    flags = ["--calib", calib, "--nsamples", "32", "--seqlen", "128", "--device", "cpu", "--batch", "2",
             "--blocksize", "32"]
    ref = base / "ref"
    run = torchrun("run", model, ref, *flags)
    assert run.returncode == 0, run.stdout
    return model, flags, ref


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and child.environ().get("LOCAL_RANK") is not None:
                return child
        except psutil.Error:
            pass
    return None


def test_sigkill_of_one_rank_then_resume(tmp_path, deep):
    """SIGKILL one rank once block 1 is journaled: the job ends (no rank waits forever), at most one message says
    so, and rerunning the command resumes from the journal to the uninterrupted two-rank result, byte for byte."""
    model, flags, ref = deep
    out = tmp_path / "out"
    launcher = torchrun("run", model, out, *flags, wait=False)
    journal = out / ".streamprune" / "journal.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and launcher.poll() is None:
        try:
            done = json.loads(journal.read_text())["done"]
        except (OSError, ValueError):
            done = {}
        if "2" in done:  # block 1 written
            break
        time.sleep(0.005)
    victim = rank_process(launcher, 1)
    assert victim is not None and launcher.poll() is None, "the run finished before a rank could be killed"
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert time.monotonic() - killed < 60
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "rerun the same command to resume" in errors[0], output  # rank 0's one line
    assert not (out / "model.safetensors.index.json").exists()
    rerun = torchrun("run", model, out, *flags)
    assert rerun.returncode == 0, rerun.stdout
    report = load_report(out)
    assert report.resumed_at_block is not None and report.resumed_at_block >= 2
    assert checkpoint_files(out) == checkpoint_files(ref)


def test_error_on_one_rank_is_reported_once_and_resumable(tmp_path, deep):
    """A solve that fails on rank 1 alone (its 5th: rank 1 solves 4 of a block's 7 linears, so this one is in block
    1) ends the job with that rank's one-line error, once; rank 0 says nothing more. The rerun resumes at block 1
    and reaches the uninterrupted result."""
    model, flags, ref = deep
    out = tmp_path / "out"
    run = torchrun("run", model, out, *flags, script=(str(ROOT / "tests" / "dist_fault.py"),),
                   env={"STREAMPRUNE_TEST_FAULT": "1:5"})
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert output.count("injected fault") == 1, output
    assert [line for line in output.splitlines() if line.startswith("error:")] == [
        "error: rank 1: injected fault in solve 5"], output
    assert "streamprune/pipeline.py" not in output  # no traceback from either rank
    rerun = torchrun("run", model, out, *flags)
    assert rerun.returncode == 0, rerun.stdout
    assert load_report(out).resumed_at_block == 1
    assert checkpoint_files(out) == checkpoint_files(ref)


def test_error_on_every_rank_is_reported_once(tmp_path, calib):
    """A NaN in block 1's weights: every rank reads it and raises the same error; it is printed once."""
    src = tiny.build(tmp_path / "model", "llama")
    shard = src / "model.safetensors"
    t = load_file(shard)
    t["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(t, shard, metadata={"format": "pt"})
    run = torchrun("run", src, tmp_path / "out", "--calib", calib, "--nsamples", "8", "--seqlen", "64")
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert output.count("contains NaN") == 1 and len([x for x in output.splitlines() if x.startswith("error:")]) == 1
    assert "model.layers.1.mlp.up_proj.weight (block 1) contains NaN" in output


def test_what_ranks_cannot_share_is_refused_up_front(tmp_path, calib):
    from streamprune.errors import ArgumentError
    from streamprune.job import prepare
    from streamprune.options import PruneOptions

    src = tiny.build(tmp_path / "model", "llama")
    with pytest.raises(ArgumentError, match="1 calibration windows cannot be shared by 2 ranks"):
        prepare(src, tmp_path / "out", PruneOptions(calib=calib, nsamples=1, seqlen=64), Ranks(0, 2))
    with pytest.raises(ArgumentError, match="1 --eval windows cannot be shared by 2 ranks"):
        prepare(src, tmp_path / "out", PruneOptions(calib=calib, nsamples=4, seqlen=64, eval=calib, eval_nsamples=1),
                Ranks(0, 2))
    moe = tiny.build(tmp_path / "moe", "mixtral")
    with pytest.raises(ArgumentError, match="--no-sequential on a Mixture-of-Experts model runs in one process"):
        prepare(moe, tmp_path / "out", PruneOptions(calib=calib, nsamples=4, seqlen=64, sequential=False), Ranks(1, 2))
    job = prepare(src, tmp_path / "out", PruneOptions(calib=calib, nsamples=5, seqlen=64), Ranks(1, 2))
    assert job.windows.shape[0] == 2 and job.work.name == "rank1"  # rank 1 of 2: windows 3 and 4 of 5
