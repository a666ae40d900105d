"""Joint sparsity + quantization (--wbits): the grid, SparseGPT's joint sweep against tests/reference.py in float64,
round-to-nearest for Wanda and magnitude, the options' checks, the report and the fingerprint."""

from __future__ import annotations

import json

import pytest
import torch

import streamprune
from streamprune.errors import ArgumentError
from streamprune.pruners import Grid, Pattern, make_pruner
from streamprune.pruners.quant import kept_range
from tests import reference, tiny
from tests.test_prune import correlated_inputs

MAX_CODE_GAP = 1e-3  # a code disagreement must be a rounding tie broken by float noise


def joint(method: str, W: torch.Tensor, X: torch.Tensor, grid: Grid, pattern: str = "unstructured",
          sparsity: float = 0.5, blocksize: int = 32):
    pat = Pattern.parse(pattern)
    p = make_pruner(method, W.shape[1], torch.device("cpu"), pat.n / pat.m if pat.structured else sparsity, pat,
                    errors=True, grid=grid, blocksize=blocksize)
    for chunk in X.split(100):
        p.add_batch(chunk)
    return p, p.prune(W)


def check_contract(res, grid: Grid) -> None:
    """The written weight is exactly (codes - zero) * scale in float32, and a removed weight's code is its zero."""
    q = res.quant
    rows, cols = res.weight.shape
    assert q.codes.dtype == torch.uint8 and q.scale.dtype == torch.float32 and q.zero.dtype == torch.uint8
    assert q.codes.shape == (rows, cols) and q.scale.shape == q.zero.shape == (rows, cols // grid.columns(cols))
    assert int(q.codes.max()) <= grid.maxq and int(q.zero.max()) <= grid.maxq
    if grid.sym:
        assert torch.all(q.zero == 2 ** (grid.bits - 1))
    g = torch.arange(cols) // grid.columns(cols)
    by_hand = (q.codes.float() - q.zero.float()[:, g]) * q.scale[:, g]
    assert torch.equal(by_hand, res.weight), "the weight is not exactly (codes - zero) * scale"
    assert torch.equal(q.codes[res.mask], q.zero[:, g][res.mask])


CASES = [  # pattern, sparsity, group size, sym; blocksize 32
    ("unstructured", 0.5, 32, True),  # group = mask block
    ("unstructured", 0.5, 16, False),  # two groups per mask block
    ("unstructured", 0.5, 48, False),  # a group straddling two blocks: blocks also break at group starts
    ("unstructured", 0.5, -1, True),  # one group per row: later blocks' masks provisional when the grid is fixed
    ("unstructured", 0.0, -1, False),  # GPTQ alone, the paper's setting
    ("unstructured", 0.0, 16, True),
    ("2:4", None, 32, False),
    ("2:4", None, -1, True),
    ("4:8", None, 16, True),
]


@pytest.mark.parametrize("pattern,sparsity,group,sym", CASES)
def test_joint_sweep_matches_float64_rederivation(pattern, sparsity, group, sym):
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(600, 96)
    grid = Grid(4, group, sym)
    _, res = joint("sparsegpt", W, X, grid, pattern, sparsity or 0.5)
    check_contract(res, grid)
    pat = Pattern.parse(pattern)
    ref = reference.sparsegpt(W, reference.hessian(X), sparsity or 0.5, blocksize=32,
                              nm=(pat.n, pat.m) if pat.structured else None, follow=res.mask,
                              grid=(4, group, sym), follow_codes=res.quant.codes)
    flips, gap = ref.flips()
    assert flips <= 2 and gap <= 1e-3, f"{flips} mask disagreements, largest gap {gap:.2e}"
    code_flips, code_gap = ref.code_flips()
    # a symmetric group's largest |w| sits exactly on a tie (max|w| / scale = maxq / 2): at most one per row and group
    ties = res.quant.scale.numel() if sym else 2
    assert code_flips <= ties and code_gap <= MAX_CODE_GAP, \
        f"{code_flips} code disagreements, tie distance {code_gap:.2e}"
    torch.testing.assert_close(res.quant.scale.double(), ref.scale, rtol=1e-4, atol=1e-7)
    assert torch.equal(res.quant.zero.double(), ref.zero)
    torch.testing.assert_close(res.weight.double(), ref.weight, atol=2e-4, rtol=1e-4)
    if pattern == "unstructured" and sparsity:
        assert res.mask.float().mean() >= 0.5


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
@pytest.mark.parametrize("group,sym", [(32, True), (-1, False)])
def test_round_to_nearest_after_masking(method, group, sym):
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    X = correlated_inputs(300, 64)
    grid = Grid(3, group, sym)
    p, res = joint(method, W, X, grid)
    check_contract(res, grid)
    plain = make_pruner(method, 64, torch.device("cpu"), 0.5, Pattern(), errors=True)
    plain.add_batch(X)
    masked = plain.prune(W)
    assert torch.equal(res.mask, masked.mask)
    g = grid.columns(64)
    v = masked.weight.reshape(24, 64 // g, g).double()  # removed weights are 0: the range of the kept ones, and 0
    s, z = reference.grid_params(v.amin(2).clamp(max=0), v.amax(2).clamp(min=0), 3, sym)
    ratio = v / s[..., None]
    expect = ((torch.round(ratio) + z[..., None]).clamp(0, 7) - z[..., None]) * s[..., None]
    clear = ((ratio - ratio.floor() - 0.5).abs() > MAX_CODE_GAP).reshape(24, 64)  # not a rounding tie
    torch.testing.assert_close(res.weight.double()[clear], expect.reshape(24, 64)[clear], atol=1e-6, rtol=1e-6)
    assert int((~clear).sum()) <= 2 * s.numel()  # the ties at a symmetric group's largest |w|, and float noise
    assert torch.equal(res.unrounded, masked.weight)
    sparse, quant = p.split_errors(W, res.unrounded, res.weight)
    assert sparse == pytest.approx(plain.reconstruction_error(W, masked.weight), rel=1e-6) and quant > 0


def test_gptq_beats_round_to_nearest_and_joint_beats_rounding_after_sparsegpt():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))
    X = correlated_inputs(1500, 128, seed=2)
    grid = Grid(4, -1, False)
    err = {}
    for name, method, sparsity in [("gptq", "sparsegpt", 0.0), ("rtn", "magnitude", 0.0), ("joint", "sparsegpt", 0.5)]:
        p, res = joint(method, W, X, grid, sparsity=sparsity)
        err[name] = p.reconstruction_error(W, res.weight)
    p, res = joint("sparsegpt", W, X, None, sparsity=0.5)  # SparseGPT alone, then rounded without compensation
    from streamprune.pruners.quant import round_to_nearest

    after = res.weight.contiguous().clone()
    round_to_nearest(after, res.mask.contiguous(), grid)
    err["sparsegpt then rtn"] = p.reconstruction_error(W, after)
    assert err["gptq"] < 0.6 * err["rtn"], err
    assert err["joint"] < err["sparsegpt then rtn"], err


def test_grid_guards_empty_groups_and_keeps_zero_on_the_grid():
    for sym in (True, False):
        grid = Grid(4, 4, sym)
        lo, hi = kept_range(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 0.25, 0.75]]), None, 1)
        scale, zero = grid.params(lo, hi)
        assert torch.isfinite(scale).all() and (scale > 0).all() and scale[0] == 1.0
        assert torch.equal(grid.codes(torch.zeros(2), scale, zero), zero)  # 0 is exactly representable
    with pytest.raises(ArgumentError, match="wbits 5"):
        Grid(5, 128, True)
    with pytest.raises(ArgumentError, match="group size 0"):
        Grid(4, 0, True)


# ---------------------------------------------------------------- through the pipeline


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("llama") / "m", "llama-gqa")


def test_bad_quantization_options_are_refused_before_writing(tmp_path, calib, llama):
    out = tmp_path / "out"
    with pytest.raises(ArgumentError, match=r"wbits 5 is not one of 2, 3, 4, 8"):
        streamprune.prune(llama, out, calib=calib, nsamples=2, seqlen=16, wbits=5, device="cpu")
    with pytest.raises(ArgumentError, match=r"group size 48 does not divide the 64 input columns of .*; group sizes "
                                            r"that divide every pruned matrix: 1, 2, 4, 8, 16, 32, or -1"):
        streamprune.prune(llama, out, calib=calib, nsamples=2, seqlen=16, wbits=4, group_size=48, device="cpu")
    with pytest.raises(ArgumentError, match=r"group size 6 is not a multiple of M=4"):
        streamprune.prune(llama, out, calib=calib, nsamples=2, seqlen=16, wbits=4, group_size=6, pattern="2:4",
                          device="cpu")
    assert not out.exists()


def test_group_size_checked_on_every_expert(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "mixtral")  # hidden 64, experts 48 wide
    with pytest.raises(ArgumentError, match=r"group size 32 does not divide the 48 input columns of "
                                            r".*experts\.\d+\.w2\.weight; .*: 1, 2, 4, 8, 16, or -1"):
        streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=2, seqlen=16, wbits=4, group_size=32,
                          device="cpu")


def test_report_and_fingerprint(tmp_path, calib, llama):
    report = streamprune.prune(llama, tmp_path / "q", calib=calib, nsamples=4, seqlen=32, wbits=4, group_size=32,
                               sym=False, device="cpu")
    assert report.fingerprint["args"]["wbits"] == 4 and report.fingerprint["args"]["sym"] is False
    for lr in report.layers:
        assert 0 < lr.quant_error < 1 and 0 < lr.sparsity_error < 1 and lr.rel_error > 0
        rows, cols = lr.shape
        assert lr.packed_bytes == rows * cols // 2 + 4 * rows * cols // 32 + rows * cols // 32 // 2
    q = report.quantization
    assert q["bits"] == 4 and q["dense_bytes"] == 4 * q["weights"] and q["packed_bytes"] < q["dense_bytes"] / 6
    saved = json.loads((tmp_path / "q" / "streamprune_report.json").read_text())
    assert saved["quantization"] == q and saved["layers"][0]["quant_error"] == report.layers[0].quant_error
    plain = streamprune.prune(llama, tmp_path / "p", calib=calib, nsamples=4, seqlen=32, device="cpu")
    assert not {"wbits", "group_size", "sym"} & set(plain.fingerprint["args"])  # old runs still resume
    assert plain.quantization is None and plain.layers[0].quant_error is None


def test_cli_run_and_plan_take_the_quantization_options(tmp_path, calib, llama):
    from typer.testing import CliRunner

    from streamprune.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(llama), "--nsamples", "4", "--seqlen", "32", "--wbits", "4",
                              "--group-size", "32", "--asym"])
    assert res.exit_code == 0, res.output
    assert "before rounding" in res.output
    res = runner.invoke(app, ["run", str(llama), str(tmp_path / "o"), "--calib", str(calib), "--nsamples", "4",
                              "--seqlen", "32", "--sparsity", "0", "--wbits", "3", "--group-size", "-1", "--asym"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "o" / "streamprune_report.json").read_text())
    assert saved["args"]["wbits"] == 3 and saved["args"]["group_size"] == -1 and saved["args"]["sym"] is False
    assert saved["quantization"]["bits"] == 3
