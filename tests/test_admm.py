"""ADMM pruning: the kept weights against a float64 least-squares solve, masks, determinism, damping, a full run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import streamprune
from streamprune.errors import ArgumentError, StreamPruneError
from streamprune.pruners import Pattern, admm, make_pruner
from streamprune.pruners.masks import row_kth_smallest
from tests import tiny
from tests.test_prune import correlated_inputs


def pruner(X: torch.Tensor, sparsity: float = 0.5, pattern: str = "unstructured", **knobs):
    pat = Pattern.parse(pattern)
    p = make_pruner("admm", X.shape[1], torch.device("cpu"), pat.n / pat.m if pat.structured else sparsity, pat,
                    **knobs)
    for chunk in X.split(256):
        p.add_batch(chunk)
    return p


def least_squares(W: torch.Tensor, X: torch.Tensor, removed: torch.Tensor, damp: float) -> torch.Tensor:
    """Per row, in float64: argmin ||X (w - w_dense)||^2 + ridge over the kept support, where the ridge is the
    damping the solver adds (damp times the mean of diag(X^T X)), written as extra rows of X."""
    X = X.double()
    ridge = (damp * (X * X).sum(0).mean()) ** 0.5
    A = torch.cat([X, ridge * torch.eye(X.shape[1], dtype=torch.float64)])
    out = torch.zeros(W.shape, dtype=torch.float64)
    for i in range(W.shape[0]):
        keep = ~removed[i]
        target = A @ W[i].double()
        out[i, keep] = torch.linalg.lstsq(A[:, keep], target[:, None]).solution[:, 0]
    return out


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def objective(W: torch.Tensor, X: torch.Tensor, pruned: torch.Tensor, damp: float) -> torch.Tensor:
    """Each row's (w - w_dense) H (w - w_dense)^T in float64, H = X^T X with the solver's ridge on its diagonal."""
    H = X.double().T @ X.double()
    H.diagonal().add_(damp * H.diagonal().mean())
    e = pruned.double() - W.double()
    return ((e @ H) * e).sum(1)


PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None)]


def unequal_inputs() -> torch.Tensor:
    X = torch.randn(1200, 96, generator=torch.Generator().manual_seed(2)) @ (
        torch.eye(96) + 0.3 * torch.randn(96, 96, generator=torch.Generator().manual_seed(3)) / 96**0.5)
    return X * (torch.rand(96, generator=torch.Generator().manual_seed(4)) + 0.5)  # unequal column norms


@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
def test_layer_error_is_within_1_percent_of_the_least_squares_optimum_of_the_final_mask(pattern, sparsity):
    """The default solve (a few preconditioned conjugate-gradient steps): the layer error, summed over the rows,
    exceeds the float64 optimum for the same mask by less than 1%."""
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    X = unequal_inputs()
    res = pruner(X, sparsity or 0.5, pattern).prune(W)
    best = objective(W, X, least_squares(W, X, res.mask, 0.01), 0.01).sum()
    gap = float(objective(W, X, res.weight, 0.01).sum() / best - 1)
    assert -1e-6 < gap < 0.01, gap
    assert torch.all(res.weight[res.mask] == 0)


def test_each_conjugate_gradient_step_lowers_every_row_objective(monkeypatch):
    """What the default solve guarantees: from the ADMM iterate (no step), each step lowers each row's objective,
    on the same mask."""
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    X = correlated_inputs(1200, 96, seed=8)
    results = []
    for steps in range(admm.PCG_STEPS + 1):
        monkeypatch.setattr(admm, "PCG_STEPS", steps)
        results.append(pruner(X, 0.7).prune(W))
    assert all(torch.equal(r.mask, results[0].mask) for r in results)
    f = [objective(W, X, r.weight, 0.01) for r in results]
    assert all(bool((b <= a * (1 + 1e-6)).all()) for a, b in zip(f, f[1:])), [float(x.sum()) for x in f]
    assert float(f[-1].sum()) < 0.9 * float(f[0].sum())


@pytest.mark.parametrize("pattern,sparsity", PATTERNS)
def test_exact_solve_gives_the_least_squares_solution_of_the_final_mask(pattern, sparsity):
    W = torch.randn(40, 96, generator=torch.Generator().manual_seed(1))
    X = unequal_inputs()
    res = pruner(X, sparsity or 0.5, pattern, admm_solve="exact").prune(W)
    ref = least_squares(W, X, res.mask, 0.01)
    assert relative(res.weight, ref) < 1e-4, relative(res.weight, ref)
    assert torch.all(res.weight[res.mask] == 0)


def test_tiny_damping_reaches_the_undamped_least_squares_solution():
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(5))
    X = torch.randn(800, 64, generator=torch.Generator().manual_seed(6))
    res = pruner(X, 0.6, damp=1e-7, admm_solve="exact").prune(W)
    ref = least_squares(W, X, res.mask, 0.0)
    assert relative(res.weight, ref) < 1e-4, relative(res.weight, ref)


def test_ill_conditioned_inputs_reach_the_optimum_of_the_mask_within_1e4_with_the_exact_solve():
    """On inputs whose spectrum decays 40x (X^T X's condition number above 1e3), each row's objective
    (w - w0) H (w - w0)^T ends within 1e-4 of the float64 optimum for the same mask."""
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(7))
    X = correlated_inputs(1500, 128, seed=3)
    res = pruner(X, 0.5, admm_solve="exact").prune(W)
    got, best = objective(W, X, res.weight, 0.01), objective(W, X, least_squares(W, X, res.mask, 0.01), 0.01)
    assert float(((got - best) / best).max()) < 1e-4, float(((got - best) / best).max())


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None)])
def test_default_solve_meets_the_conjugate_gradient_bound_on_ill_conditioned_inputs(monkeypatch, pattern, sparsity):
    """What the default solve guarantees, row by row: s steps of preconditioned conjugate gradients from the ADMM
    iterate (objective f0) leave f - f* <= 4 ((sqrt(k) - 1) / (sqrt(k) + 1))^(2 s) (f0 - f*), f* the optimum of the
    mask and k the condition number of the row's kept block of H preconditioned as the solve does (sigma I +
    V_S D V_S^T), on the inputs of the test above."""
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(7))
    X = correlated_inputs(1500, 128, seed=3)
    p = pruner(X, sparsity or 0.5, pattern)
    res = p.prune(W)
    monkeypatch.setattr(admm, "PCG_STEPS", 0)
    start = pruner(X, sparsity or 0.5, pattern).prune(W)
    assert torch.equal(start.mask, res.mask)
    best = objective(W, X, least_squares(W, X, res.mask, 0.01), 0.01)
    got, f0 = objective(W, X, res.weight, 0.01), objective(W, X, start.weight, 0.01)
    values, vectors, sigma = (t.double() if isinstance(t, torch.Tensor) else t for t in p._top)
    h = p._h.double()
    for i in range(W.shape[0]):
        keep = ~res.mask[i]
        v = vectors[keep]
        m = sigma * torch.eye(v.shape[0], dtype=torch.float64) + (v * (values - sigma)) @ v.T
        ev = torch.linalg.eigvals(torch.linalg.solve(m, h[keep][:, keep])).real
        k = float(ev.max() / ev.min())
        rate = ((k**0.5 - 1) / (k**0.5 + 1)) ** (2 * admm.PCG_STEPS)
        assert float(got[i] - best[i]) <= 4 * rate * float(f0[i] - best[i]) + 1e-5 * float(best[i]), (i, k)
    gap = float(got.sum() / best.sum() - 1)
    assert gap < 0.025, gap  # the layer's gap, measured: 1.7% at 50%, 0.2% at 70%, 1.8% at 2:4


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_every_row_loses_exactly_its_share(sparsity):
    W = torch.randn(30, 72, generator=torch.Generator().manual_seed(8))
    res = pruner(correlated_inputs(400, 72), sparsity).prune(W)
    k = -int(-sparsity * 72 // 1)  # ceil
    assert res.mask.sum(1).tolist() == [k] * 30
    assert torch.equal(res.mask, res.weight == 0) or sparsity == 0.0


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
def test_nm_masks_remove_n_of_every_m(pattern):
    pat = Pattern.parse(pattern)
    W = torch.randn(24, 64, generator=torch.Generator().manual_seed(9))
    res = pruner(correlated_inputs(400, 64), pattern=pattern).prune(W)
    removed = res.mask.view(24, 64 // pat.m, pat.m).sum(-1)
    assert torch.all(removed == pat.n), removed.unique().tolist()
    assert torch.all(res.weight[res.mask] == 0)


def test_inverse_and_triangular_solves_give_the_same_rows():
    """A linear at least as tall as its input is wide takes the W-updates as GEMMs with (H + rho I)^-1, a shorter one
    as triangular solves with its Cholesky factor; rows are solved independently, so the first rows of a tall linear
    come out as the same rows pruned alone, up to rounding."""
    W = torch.randn(100, 64, generator=torch.Generator().manual_seed(14))
    X = correlated_inputs(800, 64, seed=9)
    tall, short = pruner(X, 0.6), pruner(X, 0.6)
    a, b = tall.prune(W), short.prune(W[:30])
    assert tall._inverted and not short._inverted
    assert torch.equal(a.mask[:30], b.mask)
    torch.testing.assert_close(a.weight[:30], b.weight, rtol=1e-4, atol=1e-5)


def test_row_kth_smallest_is_kthvalue():
    # 2500 rows of 4096: three chunks of rows; many ties
    score = torch.randn(2500, 4096, generator=torch.Generator().manual_seed(13)).abs().round(decimals=1)
    score[::7, ::3] = math.inf
    for k in (1, 2000, 4096):
        assert torch.equal(row_kth_smallest(score, k), score.kthvalue(k, dim=1, keepdim=True).values), k


def test_two_runs_are_identical():
    W = torch.randn(32, 80, generator=torch.Generator().manual_seed(10))
    X = correlated_inputs(500, 80, seed=4)
    a, b = pruner(X, 0.6).prune(W), pruner(X, 0.6).prune(W)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


def test_beats_sparsegpt_on_correlated_inputs():
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(11))
    X = correlated_inputs(1500, 128, seed=5)
    errs = {}
    for method in ("admm", "sparsegpt"):
        p = make_pruner(method, 128, torch.device("cpu"), 0.5, Pattern(), errors=True)
        p.add_batch(X)
        errs[method] = p.reconstruction_error(W, p.prune(W).weight)
    assert errs["admm"] < 0.7 * errs["sparsegpt"], errs


def test_damping_is_raised_until_the_factorization_succeeds():
    X = correlated_inputs(8, 64)  # rank 8: with almost no damping and penalty the factorization fails
    p = pruner(X, 0.5, damp=1e-12, admm_rho=1e-9)
    for seed in range(32):  # the nearly singular solve, on many weights: every result finite
        res = p.prune(torch.randn(16, 64, generator=torch.Generator().manual_seed(seed)))
        assert torch.isfinite(res.weight).all(), seed
    assert res.info["damp_retries"] > 0 and res.info["damp"] > 1e-12
    bad = pruner(X.masked_fill(X > 1, float("nan")), 0.5)
    with pytest.raises(StreamPruneError, match="not positive definite"):
        bad.prune(torch.randn(16, 64))


def test_dead_inputs_are_removed():
    X = correlated_inputs(300, 32)
    X[:, 5] = 0
    res = pruner(X, 0.5).prune(torch.randn(16, 32))
    assert torch.all(res.mask[:, 5]) and torch.all(res.weight[:, 5] == 0)


@pytest.mark.parametrize("knob,value", [("admm_iterations", 0), ("admm_rho", 0.0), ("damp", -1.0),
                                        ("admm_solve", "cholesky")])
def test_bad_knobs_are_refused(tmp_path, calib, knob, value):
    src = tiny.build(tmp_path / "in", "llama-gqa")
    with pytest.raises(ArgumentError, match=knob.replace("_", "-") if knob != "damp" else "damp"):
        streamprune.prune(src, tmp_path / "out", method="admm", calib=calib, nsamples=2, seqlen=16, **{knob: value})


def test_full_run_reports_iterations_and_errors(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "llama-gqa")
    out = tmp_path / "out"
    report = streamprune.prune(src, out, method="admm", sparsity=0.5, calib=calib, nsamples=8, seqlen=64,
                               admm_iterations=6, device="cpu")
    assert report.layers and all(l.iterations == 6 and 0 < l.cg_iterations <= admm.PCG_STEPS
                                 and l.cg_residual is not None and l.rel_error is not None for l in report.layers)
    assert all(abs(l.sparsity - 0.5) < 0.02 for l in report.layers)
    saved = json.loads((out / "streamprune_report.json").read_text())
    assert saved["fingerprint"]["args"]["admm_iterations"] == 6 and saved["layers"][0]["iterations"] == 6
    assert saved["fingerprint"]["args"]["admm_solve"] == "pcg"
    sgpt = streamprune.prune(src, tmp_path / "sgpt", method="sparsegpt", sparsity=0.5, calib=calib, nsamples=8,
                             seqlen=64, device="cpu")
    assert sum(l.rel_error for l in report.layers) < sum(l.rel_error for l in sgpt.layers)
    quant = streamprune.prune(src, tmp_path / "q", method="admm", pattern="2:4", calib=calib, nsamples=8,
                              seqlen=64, wbits=4, group_size=32, device="cpu")
    assert all(l.quant_error is not None and l.sparsity >= 0.5 for l in quant.layers)


def test_resume_refuses_another_final_solve(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "llama-gqa")
    out = tmp_path / "out"
    args = dict(method="admm", sparsity=0.5, calib=calib, nsamples=4, seqlen=32, device="cpu")
    streamprune.prune(src, out, **args)
    with pytest.raises(ArgumentError, match=r"admm_solve: 'pcg' before, 'exact' now"):
        streamprune.prune(src, out, admm_solve="exact", **args)
    sgpt = tmp_path / "sgpt"
    streamprune.prune(src, sgpt, **{**args, "method": "sparsegpt"})  # a method that does not read it
    saved = json.loads((sgpt / "streamprune_report.json").read_text())
    assert "admm_solve" not in saved["fingerprint"]["args"]


def test_offloaded_hessian_gives_identical_results():
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(12))
    X = correlated_inputs(800, 128, seed=6)
    out = []
    for offload in (False, True):
        p = make_pruner("admm", 128, torch.device("cpu"), 0.5, Pattern(), offload_hessian=offload)
        p.add_batch(X)
        res = p.prune(W)
        second = p.prune(W[:20])  # a second linear reading the same input reuses the factorization
        out.append((res.weight, second.weight, p.reconstruction_error(W, res.weight)))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1]) and out[0][2] == out[1][2]


def test_cli_runs_admm_with_its_knobs(tmp_path, calib):
    from typer.testing import CliRunner

    from streamprune.cli import app

    src = tiny.build(tmp_path / "in", "llama-gqa")
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "out"), "--method", "admm", "--pattern", "2:4",
                                      "--admm-iterations", "4", "--admm-rho", "0.5", "--admm-solve", "exact",
                                      "--calib", str(calib),
                                      "--nsamples", "4", "--seqlen", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "out" / "streamprune_report.json").read_text())
    assert saved["args"]["admm_rho"] == 0.5 and {l["iterations"] for l in saved["layers"]} == {4}
    assert saved["fingerprint"]["args"]["admm_solve"] == "exact"
    plan = CliRunner().invoke(app, ["plan", str(src), "--method", "admm", "--nsamples", "4", "--seqlen", "32"])
    assert plan.exit_code == 0, plan.output
