"""Crash safety: resumed runs give byte-identical output; interrupted output never looks complete."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import streamprune
from streamprune import tensorfile
from streamprune.cli import app
from streamprune.errors import StreamPruneError
from streamprune.report import load_report
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(calib=None, nsamples=8, seqlen=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    calib = base / "calib.txt"
    calib.write_text(tiny.sample_text(15000))
    src = tiny.build(base / "model", "llama")
    ref = base / "ref"
    streamprune.prune(src, ref, calib=calib, nsamples=8, seqlen=64)
    return src, calib, ref


def checkpoint_files(out: Path) -> dict[str, bytes]:
    """Every file of the output checkpoint except the report (which holds timings)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())
            if p.is_file() and p.name != "streamprune_report.json"}


def fail_writes_after(monkeypatch, n: int) -> None:
    """Every shard after the first `n` fails when its data is flushed (after its tensors were written)."""
    real = tensorfile.ShardFile.close
    calls = {"n": 0}

    def flaky(self):
        calls["n"] += 1
        if calls["n"] > n:
            os.close(self.fd)
            self.fd = -1
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self)

    monkeypatch.setattr(tensorfile.ShardFile, "close", flaky)


@pytest.mark.parametrize("fail_after", [0, 1, 3])
def test_write_error_is_clear_and_resumable(tmp_path, monkeypatch, setup, fail_after):
    src, calib, ref = setup
    out = tmp_path / "out"
    fail_writes_after(monkeypatch, fail_after)
    with pytest.raises(StreamPruneError, match="No space left on device.*resumable"):
        streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64)
    assert not (out / "model.safetensors.index.json").exists()  # nothing that loads as complete
    assert not list(out.glob("*.tmp"))
    monkeypatch.undo()
    report = streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64)
    assert report.resumed_at_block == max(0, fail_after - 1)
    assert [(lr.block, lr.role) for lr in report.layers] == [(lr.block, lr.role) for lr in load_report(ref).layers]
    assert checkpoint_files(out) == checkpoint_files(ref)
    assert not (out / ".streamprune").exists()


def test_write_error_through_cli_exits_2(tmp_path, monkeypatch, setup):
    src, calib, _ = setup
    fail_writes_after(monkeypatch, 2)
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "out"), "--calib", str(calib),
                                      "--nsamples", "8", "--seqlen", "64"])
    assert result.exit_code == 2 and "No space left on device" in result.output
    assert "Traceback" not in result.output


def test_changed_arguments_are_refused_unless_restart(tmp_path, monkeypatch, setup):
    src, calib, ref = setup
    out = tmp_path / "out"
    fail_writes_after(monkeypatch, 2)
    with pytest.raises(StreamPruneError):
        streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64)
    monkeypatch.undo()
    with pytest.raises(StreamPruneError, match=r"different run \(sparsity: 0.5 before, 0.6 now\)"):
        streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64, sparsity=0.6)
    other = tmp_path / "other.txt"
    other.write_text(tiny.sample_text(16000))
    with pytest.raises(StreamPruneError, match="calibration data differs"):
        streamprune.prune(src, out, calib=other, nsamples=8, seqlen=64)
    report = streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64, sparsity=0.6, restart=True)
    assert report.resumed_at_block is None and report.args["sparsity"] == 0.6


def test_finished_run_is_not_redone(tmp_path, setup):
    src, calib, ref = setup
    out = tmp_path / "out"
    first = streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64)
    assert again.wall_seconds == first.wall_seconds
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp


def test_input_is_never_touched(tmp_path, setup):
    src, calib, _ = setup
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir()}
    streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=8, seqlen=64, method="wanda")
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in src.iterdir()} == before


def test_symlinked_out_dir_inside_model_dir_is_refused(tmp_path, setup):
    src, calib, _ = setup
    link = tmp_path / "sneaky"
    link.symlink_to(src)
    with pytest.raises(StreamPruneError, match="inside MODEL_DIR"):
        streamprune.prune(src, link / "out", calib=calib, nsamples=8, seqlen=64)


def test_not_enough_disk_space(tmp_path, monkeypatch, setup):
    import shutil
    from collections import namedtuple

    src, calib, _ = setup
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(StreamPruneError, match=r"needs .* GiB .* but 0.00 GiB are free"):
        streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=8, seqlen=64, offload_activations="disk")
    assert not (tmp_path / "out").exists()


def corrupted_copy(src: Path, dst: Path, name: str, value: float, where: tuple | None = None) -> Path:
    """A copy of the model with tensor `name` set to `value` (at index `where`, or everywhere)."""
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    tensors = load_file(dst / "model.safetensors")
    if where is None:
        tensors[name].fill_(value)
    else:
        tensors[name][where] = value
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nan_weight_is_named(tmp_path, setup):
    src, calib, _ = setup
    bad = corrupted_copy(src, tmp_path / "bad", "model.layers.1.mlp.up_proj.weight", float("nan"), (3, 4))
    with pytest.raises(StreamPruneError, match=r"model.layers.1.mlp.up_proj.weight \(block 1\) contains NaN"):
        streamprune.prune(bad, tmp_path / "out", calib=calib, nsamples=8, seqlen=64)


def test_infinite_activations_are_named(tmp_path, setup):
    src, calib, _ = setup
    # finite in the checkpoint, but overflows to Inf in the activations after this norm
    bad = corrupted_copy(src, tmp_path / "bad", "model.layers.0.post_attention_layernorm.weight", 3e38)
    with pytest.raises(StreamPruneError, match=r"block 0: calibration activations entering .*gate_proj") as error:
        streamprune.prune(bad, tmp_path / "out", calib=calib, nsamples=8, seqlen=64)
    # the block's shard, open when the error came, is removed as the error leaves the run (while the error, which
    # holds the run's frames, is still alive); the shard before it stays
    assert not list((tmp_path / "out").glob("*.tmp")) and len(list((tmp_path / "out").glob("*.safetensors"))) == 1
    assert error.value is not None


def test_disk_activations_give_the_same_output(tmp_path, setup):
    src, calib, ref = setup
    out = tmp_path / "out"
    report = streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64, offload_activations="disk")
    assert report.args["offload_activations"] == "disk"
    assert checkpoint_files(out) == checkpoint_files(ref)


def snapshot(out: Path) -> set[tuple[str, int]]:
    return {(str(p), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} if out.exists() else set()


@pytest.mark.parametrize("extra", [[], ["--wbits", "4", "--group-size", "32", "--format", "compressed-tensors"]],
                         ids=["dense", "packed"])
def test_sigkill_at_random_points_then_resume(tmp_path, extra):
    """Kill a run with SIGKILL at random moments, resume each time; the result equals an uninterrupted run (packed
    output too: the resumed run replays its written blocks through the output format)."""
    model, calib = tiny.deep(tmp_path, "LlamaConfig", hidden_size=128, intermediate_size=256, num_hidden_layers=8,
                             num_attention_heads=4)
    cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(model), "OUT", "--calib", str(calib),
           "--nsamples", "64", "--seqlen", "128", "--device", "cpu", "--batch", "2", "--blocksize", "32", *extra]
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run([str(ref) if c == "OUT" else c for c in cmd], check=True, capture_output=True, cwd=ROOT)
    wall = load_report(ref).wall_seconds  # from the first write to the end
    kill_and_resume([str(out) if c == "OUT" else c for c in cmd], out, ref, wall)


def test_sigkill_hybrid_with_fused_experts_then_resume(tmp_path):
    """The same on a Qwen3.5-MoE (Gated DeltaNet blocks beside attention, experts stored fused): each resumed run
    replays the written blocks, fused slices included, and writes the same bytes."""
    model, calib = tiny.deep(tmp_path, "Qwen3_5MoeTextConfig", fused=True, **{**tiny.QWEN_HYBRID, "num_hidden_layers": 8,
                                                                              "hidden_size": 96, "num_experts": 8})
    cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(model), "OUT", "--calib", str(calib), "--nsamples", "32",
           "--seqlen", "128", "--device", "cpu", "--batch", "2", "--blocksize", "32"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run([str(ref) if c == "OUT" else c for c in cmd], check=True, capture_output=True, cwd=ROOT)
    assert any("gate_up_proj" in name for name in json.loads((ref / "model.safetensors.index.json").read_text())
               ["weight_map"])
    kill_and_resume([str(out) if c == "OUT" else c for c in cmd], out, ref, load_report(ref).wall_seconds)


def kill_and_resume(run_cmd: list[str], out: Path, ref: Path, wall: float, seed: int = 1234) -> None:
    """Run `run_cmd` (writing `out`), SIGKILL it at random moments three times (or until it finishes), resume it;
    the checkpoint written equals `ref`'s, which an uninterrupted run of `wall` seconds wrote."""
    rng = random.Random(seed)
    kills = 0
    while kills < 3:
        proc = subprocess.Popen(run_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        started = time.perf_counter()
        before = snapshot(out)
        while proc.poll() is None and snapshot(out) == before:  # until it starts writing (imports are slow)
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.3) * wall)  # early enough that resumed runs, shorter each time, are hit too
        if proc.poll() is not None:
            break  # finished before the kill
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        if (out / "model.safetensors.index.json").exists():  # killed after publishing: it must be complete
            assert {k: v for k, v in checkpoint_files(out).items() if not k.endswith(".tmp")} == checkpoint_files(ref)
        assert time.perf_counter() - started < 60
    subprocess.run(run_cmd, check=True, capture_output=True, cwd=ROOT)
    assert kills >= 2, kills
    assert checkpoint_files(out) == checkpoint_files(ref)


def test_pruned_weights_reach_later_sites_contiguous(tmp_path, monkeypatch, setup):
    """The uninterrupted run must multiply the same layouts as a resumed run's replay, which reads contiguous
    tensors from the shards: a transposed view (SparseGPT sweeps W^T) would take another GEMM path."""
    import torch.nn.functional as F

    src, calib, _ = setup
    seen = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: seen.append(w.is_contiguous()) or real(x, w, b))
    streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=8, seqlen=64)
    assert seen and all(seen), f"{seen.count(False)} of {len(seen)} linears saw a non-contiguous weight"


def test_resume_in_another_environment_warns_and_reports_it(tmp_path, monkeypatch, setup, caplog):
    src, calib, ref = setup
    out = tmp_path / "out"
    fail_writes_after(monkeypatch, 2)
    with pytest.raises(StreamPruneError):
        streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64)
    monkeypatch.undo()
    path = out / ".streamprune" / "journal.json"
    journal = json.loads(path.read_text())
    assert journal["environment"]["torch"] == torch.__version__ and journal["environment"]["threads"] >= 1
    threads = journal["environment"]["threads"]
    journal["environment"]["threads"] = threads + 7
    path.write_text(json.dumps(journal))
    with caplog.at_level("WARNING"):
        report = streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64)
    assert report.environment_changes == [f"threads: {threads + 7} before, {threads} now"]
    assert "resuming in another environment" in caplog.text
    assert report.environment["float32_matmul_precision"] == torch.get_float32_matmul_precision()
    assert checkpoint_files(out) == checkpoint_files(ref)  # here only the recorded figure changed


def test_pruned_weight_that_overflows_its_dtype_is_named(tmp_path, setup):
    """Four q_proj inputs carry the same signal and their weights are 40000: 2:4 pruning moves two of them onto
    the other two (over 70000, past float16's 65504). The error names the weight and the damping, before
    anything of the block is written, instead of the next block blaming its calibration activations."""
    _, calib, _ = setup
    src = tiny.build(tmp_path / "in", "llama", dtype=torch.float16)
    tensors = load_file(src / "model.safetensors")
    tensors["model.embed_tokens.weight"][:, 1:4] = tensors["model.embed_tokens.weight"][:, :1]
    tensors["model.layers.0.input_layernorm.weight"][:4] = 1.0
    tensors["model.layers.0.self_attn.q_proj.weight"][:, :4] = 40000.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(StreamPruneError, match=r"block 0: the pruned model.layers.0.self_attn.q_proj.weight does not "
                                               r"fit torch.float16 \(largest \|w\| 7\.\d+e\+04, damping 0.01\)"):
        streamprune.prune(src, out, calib=calib, nsamples=8, seqlen=64, pattern="2:4")
    assert not (out / "model-00002-of-00004.safetensors").exists()
