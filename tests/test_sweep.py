"""`streamprune sweep`: every point pruned and evaluated in one read of the checkpoint equals the separate `run` of
that point (the same checkpoint, byte for byte, with --save-dir) and `evaluate` of its output; resumes after an
interruption; plans and refuses up front; writes sweep.json, sweep.csv and sweep.png."""

from __future__ import annotations

import csv
import json
import logging
import math
import sys
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

import streamprune
from streamprune import sweep as sweep_module
from streamprune.checkpoint import Checkpoint
from streamprune.cli import app
from streamprune.errors import ArgumentError, DataError
from streamprune.evaluate import evaluate
from streamprune.pipeline import Sweep, sweep
from streamprune.plan import sweep_plan
from tests import tiny

CALIB = dict(nsamples=4, seqlen=32, eval_nsamples=3, eval_seqlen=48)
POINTS = dict(methods=["sparsegpt", "wanda", "magnitude"], sparsities=[0.3, 0.6], patterns=["2:4"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(tiny.sample_text(15000))
    return path


def tensors(folder: Path) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.parametrize("variant,sequential", [("llama-gqa", True), ("opt", False), ("bloom", True),
                                                ("gemma2", True), ("mixtral", True), ("qwen2-moe", False)])
def test_sweep_equals_separate_runs(tmp_path, data, variant, sequential):
    src = tiny.build(tmp_path / "m", variant)
    result = sweep(src, tmp_path / "sweep", save_dir=tmp_path / "points", calib=data, eval=data, device="cpu",
                   sequential=sequential, **CALIB, **POINTS)
    assert len(result.points) == 9 and [r["reads"] for r in result.reads] == [1] * Checkpoint(src).config.n_layers
    dense = evaluate(src, data, seqlen=48, nsamples=3, device="cpu").perplexity
    assert math.isclose(result.dense_perplexity, dense, rel_tol=1e-6)
    for p in result.points:
        out = tmp_path / "run" / p["label"]
        report = streamprune.prune(src, out, method=p["method"], pattern=p["pattern"],
                                   sparsity=p["sparsity"] if p["pattern"] == "unstructured" else None, calib=data,
                                   eval=data, device="cpu", sequential=sequential, **CALIB)
        # the saved point is the run's checkpoint, tensor for tensor, and its perplexity the run's and eval's
        ran, saved = tensors(out), tensors(Path(p["checkpoint"]))
        assert ran.keys() == saved.keys() and all(ran[k].equal(saved[k]) for k in ran), p["label"]
        assert math.isclose(p["perplexity"], report.perplexity, rel_tol=1e-6), p["label"]
        assert math.isclose(p["perplexity"], evaluate(out, data, seqlen=48, nsamples=3, device="cpu").perplexity, rel_tol=1e-5)
        assert math.isclose(p["total_sparsity"], report.total_sparsity, rel_tol=1e-9)
    ppl = {p["label"]: p["perplexity"] for p in result.points}
    assert ppl["sparsegpt-0.30"] != ppl["sparsegpt-0.60"] != ppl["wanda-0.60"]  # every point its own model


def test_sweep_files_table_and_plot(tmp_path, data):
    src = tiny.build(tmp_path / "m", "llama")
    out = tmp_path / "sweep"
    result = sweep(src, out, calib=data, eval=data, device="cpu", **CALIB, **POINTS)
    raw = json.loads((out / "sweep.json").read_text())
    assert raw["dense_perplexity"] == result.dense_perplexity
    assert [(p["method"], p["pattern"], p["sparsity"]) for p in raw["points"]] == [
        (m, pattern, s) for m in POINTS["methods"] for pattern, s in (("unstructured", 0.3), ("unstructured", 0.6),
                                                                      ("2:4", 0.5))]
    assert all(p["perplexity"] > 0 and p["seconds"] > 0 for p in raw["points"])
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert rows[0]["method"] == "dense" and len(rows) == 10
    assert math.isclose(float(rows[1]["perplexity"]), raw["points"][0]["perplexity"], rel_tol=1e-5)
    png = (out / "sweep.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert not (out / ".streamprune").exists()  # the saved streams go once the sweep is done


def test_no_matplotlib_skips_the_plot_with_a_notice(tmp_path, data, monkeypatch, caplog):
    src = tiny.build(tmp_path / "m", "llama")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    with caplog.at_level(logging.WARNING, logger="streamprune.sweep"):
        sweep(src, tmp_path / "sweep", methods=["magnitude"], sparsities=[0.5], calib=data, eval=data, device="cpu",
              **CALIB)
    assert (tmp_path / "sweep" / "sweep.json").is_file() and not (tmp_path / "sweep" / "sweep.png").exists()
    assert "matplotlib is not installed" in caplog.text and "streamprune[plot]" in caplog.text


def test_interrupted_sweep_resumes_at_the_first_unfinished_block(tmp_path, data, monkeypatch):
    src = tiny.build(tmp_path / "m", "llama")  # 3 blocks
    args = dict(calib=data, eval=data, device="cpu", **CALIB, **POINTS)
    ref = sweep(src, tmp_path / "ref", **args)
    real, calls = Sweep.save_state, {"n": 0}

    def killed_after_two_blocks(self, done, *streams):
        real(self, done, *streams)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill would stop it: block 1 saved, block 2 not started

    monkeypatch.setattr(Sweep, "save_state", killed_after_two_blocks)
    out = tmp_path / "sweep"
    with pytest.raises(KeyboardInterrupt):
        sweep(src, out, **args)
    monkeypatch.undo()
    assert not (out / "sweep.json").exists()
    result = sweep(src, out, **args)
    assert result.resumed_at_block == 2
    assert [r["reads"] for r in result.reads] == [1, 1, 1]  # block 2 read once, by the rerun
    assert result.dense_perplexity == ref.dense_perplexity
    assert [p["perplexity"] for p in result.points] == [p["perplexity"] for p in ref.points]
    # a changed sweep is refused; the finished one returns its result
    with pytest.raises(ArgumentError, match="different sweep.*points"):
        sweep(src, out, **(args | {"sparsities": [0.3]}))
    assert sweep(src, out, **args).points == result.points


@pytest.mark.parametrize("variant,sequential", [("llama", True), ("qwen3-moe", False)])
def test_sweep_resume_with_saved_checkpoints(tmp_path, data, monkeypatch, variant, sequential):
    src = tiny.build(tmp_path / "m", variant)
    args = dict(calib=data, eval=data, device="cpu", methods=["sparsegpt"], sparsities=[0.5], sequential=sequential,
                **CALIB)
    sweep(src, tmp_path / "ref", save_dir=tmp_path / "ref-points", **args)
    real, calls = Sweep.save_state, {"n": 0}

    def killed(self, done, *streams):
        real(self, done, *streams)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Sweep, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep(src, tmp_path / "sweep", save_dir=tmp_path / "points", **args)
    monkeypatch.undo()
    result = sweep(src, tmp_path / "sweep", save_dir=tmp_path / "points", **args)
    assert result.resumed_at_block == 1
    ref, got = tensors(tmp_path / "ref-points" / "sparsegpt-0.50"), tensors(tmp_path / "points" / "sparsegpt-0.50")
    assert ref.keys() == got.keys() and all(ref[k].equal(got[k]) for k in ref)
    assert math.isclose(evaluate(tmp_path / "points" / "sparsegpt-0.50", data, seqlen=48, nsamples=3, device="cpu").perplexity,
                        result.points[0]["perplexity"], rel_tol=1e-5)


def test_plan_grows_with_the_points_and_the_sweep_refuses_what_does_not_fit(tmp_path, data, monkeypatch):
    src = tiny.build(tmp_path / "m", "llama")
    opts = dict(eval=data, device="cpu", **CALIB)
    one = sweep_plan(src, methods=["sparsegpt"], sparsities=[0.5], **opts)
    many = sweep_plan(src, methods=["sparsegpt", "wanda", "magnitude"], sparsities=[0.3, 0.5, 0.7], patterns=["2:4"],
                      **opts)
    acts = lambda p: sum(b for w, b, _ in p.consumers if "activations" in w or "hidden states" in w)  # noqa: E731
    # per point: two calibration buffers (4 x 32 x 64 floats) unless magnitude, and an evaluation stream (3 x 48 x
    # 64); and the dense model's evaluation stream
    calib, ev = 2 * 4 * 32 * 64 * 4, 3 * 48 * 64 * 4
    assert acts(one) == calib + 2 * ev and acts(many) == 8 * calib + 13 * ev
    assert many.host_peak - one.host_peak == acts(many) - acts(one)  # weights and workspaces do not grow
    with pytest.raises(DataError, match="--eval"):
        sweep_plan(src, methods=["sparsegpt"], sparsities=[0.5], device="cpu")

    class Tiny:
        available = 64 * 2**20  # less than the interpreter alone

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(ArgumentError, match=r"sweep: the points need \d+\.\d+ GiB of host memory"):
        sweep(src, tmp_path / "sweep", calib=data, offload_activations="cpu", **POINTS, **opts)
    assert not (tmp_path / "sweep").exists()


def test_sweep_refusals(tmp_path, data):
    src = tiny.build(tmp_path / "m", "llama")
    args = dict(calib=data, eval=data, device="cpu", **CALIB)
    with pytest.raises(DataError, match="--eval FILE"):
        sweep(src, tmp_path / "a", methods=["wanda"], sparsities=[0.5], calib=data)
    assert [p.label for p in sweep_module.sweep_points(["wanda"], [0.12, 0.125, 0.5], ["2:4"])] == [
        "wanda-0.12", "wanda-0.125", "wanda-0.50", "wanda-2of4"]
    with pytest.raises(ArgumentError, match="given twice"):
        sweep(src, tmp_path / "a", methods=["wanda", "wanda"], sparsities=[0.5], **args)
    with pytest.raises(ArgumentError, match="not one of"):
        sweep(src, tmp_path / "a", methods=["obs"], sparsities=[0.5], **args)
    with pytest.raises(ArgumentError, match="not N:M"):
        sweep(src, tmp_path / "a", methods=["wanda"], patterns=["unstructured"], **args)
    with pytest.raises(TypeError, match="wbits"):
        sweep(src, tmp_path / "a", methods=["wanda"], sparsities=[0.5], wbits=4, **args)
    with pytest.raises(TypeError, match="allocation"):
        sweep(src, tmp_path / "a", methods=["wanda"], sparsities=[0.5], allocation="owl", **args)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WORLD_SIZE", "2")
        with pytest.raises(ArgumentError, match="without torchrun"):
            sweep(src, tmp_path / "a", methods=["wanda"], sparsities=[0.5], **args)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep")
    with pytest.raises(ArgumentError, match="holds no sweep"):
        sweep(src, tmp_path / "busy", methods=["wanda"], sparsities=[0.5], **args)
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep"


def test_cli_sweep_and_plan(tmp_path, data):
    src = tiny.build(tmp_path / "m", "llama")
    out = tmp_path / "sweep"
    common = ["--eval", str(data), "--nsamples", "4", "--seqlen", "32", "--eval-nsamples", "3", "--eval-seqlen", "48",
              "--device", "cpu", "--methods", "sparsegpt,magnitude", "--sparsities", "0.4,0.8", "--patterns", "2:4"]
    res = CliRunner().invoke(app, ["sweep", str(src), str(out), "--calib", str(data), *common])
    assert res.exit_code == 0, res.output
    assert "sparsegpt" in res.output and "read 1 time" in res.output and "sweep.png" in res.output
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 6
    res = CliRunner().invoke(app, ["plan", str(src), "--sweep", *common])
    assert res.exit_code == 0, res.output
    assert "6 points" in res.output and "predicted peak" in res.output
    res = CliRunner().invoke(app, ["sweep", str(src), str(out), "--calib", str(data), *common[:-6],
                                   "--sparsities", "0.4,x"])
    assert res.exit_code == 2 and "comma-separated list of numbers" in res.output


def test_points_hold_one_pruned_block_at_a_time(tmp_path, data, monkeypatch):
    """Every point of a sweep prunes its own copy of a block; once it has entered a dense block, it holds none of
    its pruned weights while the other points prune theirs (only a block whose experts are read back keeps them)."""
    from streamprune.lane import PruneLane

    src = tiny.build(tmp_path / "m", "llama")
    held = []
    real = PruneLane.leave

    def leave(self, block):
        held.append(len(self.w))
        real(self, block)

    monkeypatch.setattr(PruneLane, "leave", leave)
    sweep(src, tmp_path / "sweep", calib=data, eval=data, device="cpu", methods=["sparsegpt", "wanda"],
          sparsities=[0.5], **CALIB)
    assert len(held) == 2 * 3 and set(held) == {0}


@pytest.mark.parametrize("variant,sequential,compensate", [("mixtral", True, True), ("qwen2-moe", False, False)])
def test_expert_removal_points_equal_separate_runs(tmp_path, data, variant, sequential, compensate):
    """Every (fraction, criterion, compensation) point, with the weights pruned too or not, from one read of the
    checkpoint (each block's experts read twice: the survey and the expert pass): the same experts removed, the same
    checkpoint and the same perplexity as a separate `run` of it."""
    src = tiny.build(tmp_path / "m", variant)
    result = sweep(src, tmp_path / "sweep", save_dir=tmp_path / "points", calib=data, eval=data, device="cpu",
                   sequential=sequential, methods=["sparsegpt"], sparsities=[0.0, 0.5], prune_experts=[0.25, 0.5],
                   expert_criteria=["reap", "frequency"], compensate_experts=compensate, **CALIB)
    assert len(result.points) == 2 * 2 * 2 * (2 if compensate else 1)
    moe = Checkpoint(src)
    assert [(r["reads"], r["expert_passes"]) for r in result.reads] == [
        (1, 2 if moe.n_experts(b) else 0) for b in range(moe.config.n_layers)]
    for p in result.points:
        out = tmp_path / "run" / p["label"]
        report = streamprune.prune(src, out, method="sparsegpt", sparsity=p["sparsity"], calib=data, eval=data,
                                   device="cpu", sequential=sequential, prune_experts=p["prune_experts"],
                                   expert_criterion=p["expert_criterion"],
                                   compensate_experts=p["compensate_experts"], **CALIB)
        assert [b["removed"] for b in p["experts"]] == [b["removed"] for b in report.experts], p["label"]
        assert math.isclose(p["perplexity"], report.perplexity, rel_tol=1e-6), p["label"]
        ran, saved = tensors(out), tensors(Path(p["checkpoint"]))
        assert ran.keys() == saved.keys() and all(ran[k].equal(saved[k]) for k in ran), p["label"]
    ppl = {p["label"]: p["perplexity"] for p in result.points}
    assert len(set(ppl.values())) == len(ppl)  # every point its own model
    rows = list(csv.DictReader(open(tmp_path / "sweep" / "sweep.csv")))
    assert [r["expert_criterion"] for r in rows[1:]] == [p["expert_criterion"] for p in result.points]


def test_expert_sweep_refusals(tmp_path, data):
    src = tiny.build(tmp_path / "m", "mixtral")
    args = dict(calib=data, eval=data, device="cpu", methods=["sparsegpt"], **CALIB)
    with pytest.raises(ArgumentError, match="--expert-criteria 'random': each must be one of reap, ean, frequency"):
        sweep(src, tmp_path / "a", prune_experts=[0.5], expert_criteria=["random"], **args)
    with pytest.raises(ArgumentError, match="keeps 1 of 4 experts per block"):
        sweep(src, tmp_path / "a", prune_experts=[0.75], **args)
    with pytest.raises(ArgumentError, match="needs --sequential"):
        sweep(src, tmp_path / "a", prune_experts=[0.5], sparsities=[0.5], compensate_experts=True, sequential=False,
              **args)
    assert not (tmp_path / "a").exists()
