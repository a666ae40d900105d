"""`run --eval`: the pruned model's perplexity computed in the pruning pass equals `evaluate` on the written output,
and `--eval-dense` equals it on the input; through resume, experts, every placement and the command line."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

import streamprune
from streamprune.cli import app
from streamprune.errors import ArgumentError
from streamprune.evaluate import evaluate
from streamprune.plan import plan
from tests import tiny
from tests.test_resume import fail_writes_after

EVAL = dict(eval_nsamples=3, eval_seqlen=48)  # another length than calibration's: its own positions


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "data.txt"
    path.write_text(tiny.sample_text(15000))
    return path


def check(report, out, src, data, dense: bool = True) -> None:
    assert report.eval["windows"] == 3 and report.eval["seqlen"] == 48 and report.eval["tokens"] == 3 * 47
    assert math.isclose(report.perplexity, evaluate(out, data, seqlen=48, nsamples=3, device="cpu").perplexity, rel_tol=1e-5)
    if dense:
        assert math.isclose(report.dense_perplexity, evaluate(src, data, seqlen=48, nsamples=3, device="cpu").perplexity, rel_tol=1e-5)
        assert report.perplexity != report.dense_perplexity  # the two streams went through different weights


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "no-sequential"])
@pytest.mark.parametrize("variant", ["llama-gqa", "mistral", "qwen2", "qwen3", "opt", "bloom", "gemma2", "gemma3", "phi3",
                                     "mixtral", "qwen2-moe", "qwen3-moe"])  # every family
def test_run_eval_matches_evaluate_of_the_output(tmp_path, data, variant, sequential):
    src = tiny.build(tmp_path / "m", variant)
    out = tmp_path / "out"
    report = streamprune.prune(src, out, calib=data, nsamples=4, seqlen=32, sequential=sequential, eval=data,
                               eval_dense=True, **EVAL)
    check(report, out, src, data)
    assert report.phases["eval"] > 0


@pytest.mark.parametrize("variant", ["llama", "qwen2-moe"])
def test_resumed_run_rebuilds_the_eval_streams(tmp_path, monkeypatch, data, variant):
    src = tiny.build(tmp_path / "m", variant)
    args = dict(calib=data, nsamples=4, seqlen=32, eval=data, eval_dense=True, **EVAL)
    ref = streamprune.prune(src, tmp_path / "ref", **args)
    out = tmp_path / "out"
    fail_writes_after(monkeypatch, 2)  # the globals and block 0 written
    with pytest.raises(Exception, match="No space left"):
        streamprune.prune(src, out, **args)
    monkeypatch.undo()
    report = streamprune.prune(src, out, **args)
    assert report.resumed_at_block == 1 and report.phases["replay"] > 0
    assert (report.perplexity, report.dense_perplexity) == (ref.perplexity, ref.dense_perplexity)
    check(report, out, src, data)


@pytest.mark.parametrize("variant", ["llama", "mixtral"])
def test_eval_without_calibration_and_on_disk(tmp_path, data, variant):
    """Magnitude without calibration data has no calibration forward: the eval streams run alone; and placed on
    disk, like calibration activations that do not fit in memory."""
    src = tiny.build(tmp_path / "m", variant)
    out = tmp_path / "out"
    report = streamprune.prune(src, out, method="magnitude", eval=data, eval_dense=True,
                               offload_activations="disk", **EVAL)
    assert report.args["offload_activations"] == "disk"
    check(report, out, src, data)


def test_eval_options_need_eval(tmp_path, data):
    src = tiny.build(tmp_path / "m", "llama")
    with pytest.raises(ArgumentError, match="need --eval FILE"):
        streamprune.prune(src, tmp_path / "out", method="magnitude", eval_dense=True)


def test_plan_counts_the_eval_hidden_states(tmp_path, data):
    src = tiny.build(tmp_path / "m", "mixtral")
    base = plan(src, nsamples=4, seqlen=32, device="cpu")
    with_eval = plan(src, nsamples=4, seqlen=32, device="cpu", eval=data, eval_dense=True, **EVAL)
    consumers = {what: nbytes for what, nbytes, _ in with_eval.consumers}
    assert consumers["evaluation hidden states (--eval, --eval-tasks, --eval-dense)"] == 2 * 2 * 3 * 48 * 64 * 4  # 2 streams x 2 buffers
    assert with_eval.host_peak - base.host_peak >= 2 * 2 * 3 * 48 * 64 * 4


def test_cli_run_eval_prints_and_reports_perplexity(tmp_path, data):
    src = tiny.build(tmp_path / "m", "llama")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(src), str(out), "--calib", str(data), "--nsamples", "4", "--seqlen",
                                      "32", "--eval", str(data), "--eval-nsamples", "3", "--eval-seqlen", "48",
                                      "--eval-dense"])
    assert result.exit_code == 0, result.output
    report = streamprune.report.load_report(out)
    assert f"perplexity {report.perplexity:.4f}, dense {report.dense_perplexity:.4f}" in result.output
    check(report, out, src, data)
