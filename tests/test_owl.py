"""--allocation owl: the paper's allocation formula, its outlier ratios against transformers, exact totals, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import streamprune
from streamprune.calib import calib_windows
from streamprune.errors import StreamPruneError
from streamprune.owl import allocate, linear_zeros
from streamprune.job import prepare
from streamprune.options import PruneOptions
from streamprune.report import load_report
from streamprune.plan import plan
from streamprune.pruners.masks import row_mask_exact
from tests import tiny
from tests.test_resume import checkpoint_files, fail_writes_after

NSAMPLES, SEQLEN = 8, 64
ARGS = dict(nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu")

# Outlier ratios (M = 5) of the demo model of bench/tinylm.py (4 blocks), as `python bench/owl.py` reports them,
# and a 32-block profile shaped like the one the paper shows for LLaMA-7B (higher in the first and last blocks).
DEMO_RATIOS = [0.03914, 0.01177, 0.01528, 0.01807]
PROFILE_32 = [0.02 + 0.01 * math.cos(i / 31 * math.pi) ** 2 + 0.002 * (i % 3) for i in range(32)]


def paper_owl(ratios: list[float], sparsity: float, lamda: float) -> np.ndarray:
    """The OWL code's allocation (luuyin/OWL, lib/prune_all.py, prune_wanda_outlier), written out as there: the
    layer outlier ratios in percent, scaled to [0, 2 lambda], centred on the target density."""
    all_layer_ratio = np.array(ratios) * 100
    all_layer_ratio = ((all_layer_ratio - all_layer_ratio.min())
                       * (1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lamda * 2))
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - sparsity)
    return 1 - all_layer_ratio  # layer_sparsity_ratio = 1 - all_layer_ratio[i]


@pytest.mark.parametrize("ratios", [DEMO_RATIOS, PROFILE_32], ids=["demo", "profile32"])
@pytest.mark.parametrize("sparsity", [0.5, 0.7])
@pytest.mark.parametrize("lamda", [0.08, 0.2])
def test_allocation_is_the_papers_formula(ratios, sparsity, lamda):
    got = allocate(ratios, [1000] * len(ratios), sparsity, lamda)  # blocks alike, as in the paper
    np.testing.assert_allclose(got, paper_owl(ratios, sparsity, lamda), rtol=0, atol=1e-12)
    assert np.argmax(got) == np.argmin(ratios) and np.argmin(got) == np.argmax(ratios)  # outliers keep weights


def test_unequal_blocks_keep_the_weighted_mean_and_the_papers_spread():
    ratios, weights = [0.01, 0.03, 0.02, 0.05], [100, 300, 250, 50]
    got = np.array(allocate(ratios, weights, 0.7, 0.08))
    assert abs(float(np.dot(got, weights)) / sum(weights) - 0.7) < 1e-15
    paper = paper_owl(ratios, 0.7, 0.08)  # the same differences between blocks, another centre
    np.testing.assert_allclose(got - got[0], paper - paper[0], atol=1e-15)


def test_uniform_when_nothing_to_weigh():
    assert allocate([0.02, 0.02, 0.02], [5, 6, 7], 0.6, 0.08) == [0.6] * 3
    assert allocate([0.01, 0.02], [5, 6], 0.6, 0.0) == [0.6] * 2
    with pytest.raises(StreamPruneError, match=r"owl-lambda 0\.5 moves block sparsities outside \[0, 1\)"):
        allocate([0.01, 0.02], [5, 5], 0.7, 0.5)


def test_linear_zeros_are_exact_in_total_and_per_linear():
    linears = [(f"l{i}", n, s) for i, (n, s) in enumerate([(4096, 0.7312), (12288, 0.7312), (4096, 0.6688),
                                                            (777, 0.6688), (12288, 0.6688)])]
    zeros = linear_zeros(linears)
    assert sum(zeros.values()) == round(sum(n * s for _, n, s in linears))
    for name, n, s in linears:
        assert abs(zeros[name] - n * s) < 1


def test_row_mask_exact():
    torch.manual_seed(0)
    score = torch.rand(7, 10)
    mask = row_mask_exact(score, 33)  # 4 per row, and 5 rows give one more
    per_row = mask.sum(1)
    assert int(mask.sum()) == 33 and sorted(per_row.tolist()) == [4, 4, 5, 5, 5, 5, 5]
    for r in range(7):  # each row loses its lowest scores
        k = int(per_row[r])
        assert set(mask[r].nonzero().flatten().tolist()) == set(score[r].argsort()[:k].tolist())
    fifth = score.sort(1).values[:, 4]  # the rows that give a fifth weight are those whose fifth score is lowest
    assert set((per_row == 5).nonzero().flatten().tolist()) == set(fifth.argsort()[:5].tolist())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = tmp_path_factory.mktemp("owl")
    calib = base / "calib.txt"
    calib.write_text(tiny.sample_text(15000))
    return tiny.build(base / "model", "llama"), calib


@torch.no_grad()
def transformers_ratios(src, calib, m: float) -> list[float]:
    """Each block's outlier ratio from transformers' dense model: forward hooks collect every linear's input
    over the calibration windows, the scores |W_ij| ||X_j|| of the block's linears are put together, and the
    share above m times their mean is counted (the OWL code's check_outlier_mean)."""
    model = tiny.hf_model(src)
    windows = calib_windows(calib, src, tiny.VOCAB, SEQLEN, NSAMPLES, 0)
    sq: dict[str, torch.Tensor] = {}
    linears = {n: mod for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear) and ".layers." in n}

    def hook(mod, args, name):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        sq[name] = sq.get(name, 0) + (x**2).sum(0)

    handles = [mod.register_forward_pre_hook(lambda mod, args, name=name: hook(mod, args, name))
               for name, mod in linears.items()]
    model(windows, use_cache=False)
    for h in handles:
        h.remove()
    ratios = []
    for b in range(model.config.num_hidden_layers):
        scores = torch.cat([(mod.weight.double().abs() * sq[n].sqrt()[None, :]).flatten()
                            for n, mod in linears.items() if f".layers.{b}." in n])
        ratios.append(float((scores > scores.mean() * m).sum()) / scores.numel())
    return ratios


@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude", "admm"])
def test_owl_run_prunes_each_block_as_allocated(tmp_path, llama, method):
    src, calib = llama
    report = streamprune.prune(src, tmp_path / "out", method=method, sparsity=0.7, calib=calib, allocation="owl",
                               **ARGS)
    alloc = report.allocation
    assert alloc is not None and alloc["owl_lambda"] == 0.08 and alloc["owl_m"] == 5.0
    reference = transformers_ratios(src, calib, 5.0)
    # the same ratios up to a weight or two at the threshold (float32 against float64 norms)
    np.testing.assert_allclose(alloc["outlier_ratios"], reference, rtol=0, atol=2 / min(alloc["block_weights"]))
    np.testing.assert_allclose(report.block_sparsity, allocate(reference, alloc["block_weights"], 0.7, 0.08),
                               atol=1e-3)
    assert max(report.block_sparsity) - min(report.block_sparsity) == pytest.approx(0.16)  # 2 lambda, 3 blocks
    for b, target in enumerate(report.block_sparsity):
        rows = [lr for lr in report.layers if lr.block == b]
        zeros = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in rows)
        assert abs(zeros - target * alloc["block_weights"][b]) <= len(rows)  # within a weight per linear
    assert f"{report.total_sparsity:.4f}" == "0.7000"
    weights = sum(alloc["block_weights"])
    assert round(report.total_sparsity * weights) == round(0.7 * weights)  # exactly, to the weight
    assert report.phases["owl"] > 0
    written = streamprune.evaluate(tmp_path / "out", calib, seqlen=SEQLEN, device="cpu")
    assert math.isfinite(written.perplexity)


def test_uniform_fingerprint_is_unchanged(tmp_path, llama):
    src, calib = llama
    job = prepare(src, tmp_path / "u", PruneOptions(calib=calib, **ARGS))
    assert set(job.fingerprint["args"]) == {"method", "sparsity", "pattern", "nsamples", "seqlen", "seed", "device",
                                            "sequential", "batch", "layer_errors", "blocksize", "damp"}
    owl = prepare(src, tmp_path / "o", PruneOptions(calib=calib, allocation="owl", **ARGS))
    assert {k: owl.fingerprint["args"][k] for k in ("allocation", "owl_lambda", "owl_m")} == {
        "allocation": "owl", "owl_lambda": 0.08, "owl_m": 5.0}


def test_resume_reuses_the_allocation_and_refuses_another(tmp_path, monkeypatch, llama):
    src, calib = llama
    ref = streamprune.prune(src, tmp_path / "ref", method="wanda", sparsity=0.6, calib=calib, allocation="owl", **ARGS)
    out = tmp_path / "out"
    fail_writes_after(monkeypatch, 2)
    with pytest.raises(StreamPruneError):
        streamprune.prune(src, out, method="wanda", sparsity=0.6, calib=calib, allocation="owl", **ARGS)
    monkeypatch.undo()
    with pytest.raises(StreamPruneError, match=r"different run \(allocation: 'owl' before, None now; owl_lambda"):
        streamprune.prune(src, out, method="wanda", sparsity=0.6, calib=calib, **ARGS)
    with pytest.raises(StreamPruneError, match=r"different run \(owl_lambda: 0.08 before, 0.05 now\)"):
        streamprune.prune(src, out, method="wanda", sparsity=0.6, calib=calib, allocation="owl", owl_lambda=0.05,
                          **ARGS)
    report = streamprune.prune(src, out, method="wanda", sparsity=0.6, calib=calib, allocation="owl", **ARGS)
    assert report.resumed_at_block == 1 and report.phases["owl"] == 0  # the journal's allocation, no second pass
    assert report.block_sparsity == ref.block_sparsity and report.allocation == ref.allocation
    assert checkpoint_files(out) == checkpoint_files(tmp_path / "ref")
    with pytest.raises(StreamPruneError, match="different run"):  # a finished owl run is not a uniform one
        streamprune.prune(src, out, method="wanda", sparsity=0.6, calib=calib, **ARGS)
    assert load_report(out).allocation == ref.allocation


def test_refusals(tmp_path, llama):
    src, calib = llama
    with pytest.raises(StreamPruneError, match=r"^--allocation owl needs unstructured sparsity: an N:M pattern "
                                               r"\('2:4'\) keeps uniform allocation$"):
        streamprune.prune(src, tmp_path / "a", pattern="2:4", calib=calib, allocation="owl", **ARGS)
    with pytest.raises(StreamPruneError, match=r"^--allocation owl needs calibration data: pass --calib FILE$"):
        streamprune.prune(src, tmp_path / "b", method="magnitude", allocation="owl", **ARGS)
    with pytest.raises(StreamPruneError, match=r"^allocation 'outlier' is not one of uniform, owl$"):
        streamprune.prune(src, tmp_path / "c", calib=calib, allocation="outlier", **ARGS)
    with pytest.raises(StreamPruneError, match=r"^owl-m -1\.0 must be"):
        streamprune.prune(src, tmp_path / "d", calib=calib, allocation="owl", owl_m=-1.0, **ARGS)
    moe = tiny.build(tmp_path / "moe", "qwen2-moe")
    with pytest.raises(StreamPruneError, match=r"^--allocation owl does not support Mixture-of-Experts models "
                                               r"\(model_type 'qwen2_moe'\)"):
        streamprune.prune(moe, tmp_path / "e", calib=calib, allocation="owl", **ARGS)
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_cli_and_plan(tmp_path, llama):
    from typer.testing import CliRunner

    from streamprune.cli import app

    src, calib = llama
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "out"), "--calib", str(calib), "--nsamples", "8",
                                      "--seqlen", "64", "--method", "magnitude", "--sparsity", "0.6",
                                      "--allocation", "owl", "--owl-lambda", "0.1", "--owl-m", "4"])
    assert result.exit_code == 0, result.output
    report = load_report(tmp_path / "out")
    assert report.allocation["owl_lambda"] == 0.1 and report.allocation["owl_m"] == 4.0
    assert "allocation owl (lambda 0.1, M 4)" in result.output
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "nm"), "--calib", str(calib), "--pattern", "2:4",
                                      "--allocation", "owl"])
    assert result.exit_code == 2 and "N:M pattern ('2:4') keeps uniform allocation" in result.output
    # magnitude holds no activations but for the allocation's dense pass, which the plan counts
    assert plan(src, nsamples=8, seqlen=64, method="magnitude", device="cpu").consumers
    plain = dict((w, b) for w, b, _ in plan(src, nsamples=8, seqlen=64, method="magnitude", device="cpu").consumers)
    owl = dict((w, b) for w, b, _ in plan(src, nsamples=8, seqlen=64, method="magnitude", device="cpu",
                                          allocation="owl").consumers)
    key = "calibration activations (input and output buffers)"
    assert plain[key] == 0 and owl[key] == 8 * 64 * 64 * 4


def test_owl_with_quantization(tmp_path, llama):
    """SparseGPT's exact per-block counts also drive the provisional masks that set a group's grid (--wbits)."""
    src, calib = llama
    report = streamprune.prune(src, tmp_path / "out", sparsity=0.6, calib=calib, allocation="owl", wbits=4,
                               group_size=16, blocksize=32, **ARGS)
    for b, target in enumerate(report.block_sparsity):
        rows = [lr for lr in report.layers if lr.block == b]
        zeros = sum(lr.sparsity * lr.shape[0] * lr.shape[1] for lr in rows)
        # exactly the allocated count removed; a kept weight rounded to the grid's 0 only adds a few zeros
        assert target * report.allocation["block_weights"][b] - len(rows) <= zeros
        assert zeros <= (target + 0.01) * report.allocation["block_weights"][b]
