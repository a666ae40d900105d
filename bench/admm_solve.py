"""ADMM's solve, stage by stage, on the linears of one block: what its factorization costs, and what each candidate
for the final weights costs and leaves of the layer error.

    python bench/admm_solve.py                       # the demo model's last block at 70%
    python bench/admm_solve.py --pattern 2:4
    python bench/admm_solve.py --model mid --sparsity 0.5    # bench/speed.py's block (its last, hidden 2048)

torch's threads (one per core), as bench/speed.py.

Each linear's X^T X comes from the dense model (streamprune's block forward over the calibration windows: the
demo's for `demo`, bench/speed.py's random tokens for `mid`), damped and scaled as `--method admm` does.

The first table takes each distinct input of the block (width d; rows: those of the linears that read it) and
times what the ADMM iterations need of H: the factorization once per input for a fixed rho (Cholesky of H + rho I)
or for a rho schedule (an eigendecomposition of H, after which every rho costs nothing to set up), and one
iteration's W-update of every linear reading it: two triangular solves with the Cholesky factor, two GEMMs with the
eigenvectors, or one GEMM with (H + rho I)^-1 formed explicitly (its inverse: `inverse s`).

The second table runs the ADMM iterations once per linear and then each candidate for the final weights on the
same mask: seconds over the block, and the layer error (the sum over the block's linears of
(w - w0) H (w - w0)^T, H as damped) in excess of the exact solve's for the same mask (`gap`). Candidates: the
iterate as it is (the last W-update with the removed weights set to 0); SparseGPT's OBS sweep in column blocks of
128 with the mask fixed (its own factorization of H^-1 included); conjugate gradients with Jacobi's preconditioner
(the identity: H has a unit diagonal in ADMM's scaling) and with ADMM's deflated preconditioner (H's largest
eigenpairs; its setup included), at a fixed number of steps; the exact solve (until every row's estimated gap is
below 2e-6).

The third table runs the whole solve of each linear (search and final weights) with fewer ADMM iterations than
the default's and the default final solve: seconds over the block, and the layer error in excess of the default
iterations' with the exact solve (the second table's `exact` row: its masks are not the same).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.demo import NSAMPLES, SEQLEN  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.speed import SHAPES  # noqa: E402
from bench.synth import make_checkpoint  # noqa: E402
from bench.tinylm import demo_model  # noqa: E402
from streamprune.activations import Activations  # noqa: E402
from streamprune.arch.block import positions  # noqa: E402
from streamprune.calib import calib_windows  # noqa: E402
from streamprune.checkpoint import Checkpoint  # noqa: E402
from streamprune.forward import embed_windows, forward_block  # noqa: E402
from streamprune.owl import block_linears  # noqa: E402
from streamprune.pruners import Pattern, make_pruner  # noqa: E402
from streamprune.pruners.admm import CG_MAX_ITERATIONS, PCG_STEPS, ADMM, dot  # noqa: E402
from streamprune.pruners.factor import inverse_factor_  # noqa: E402

STEPS = (1, 2, 3, 4, 6, 8)
ITERATIONS = (4, 5, 6, 8)
BATCH = 4


def block_sites(model: Path, data: Path, seqlen: int, nsamples: int, sparsity: float,
                pattern: Pattern) -> list[tuple[str, ADMM, Tensor]]:
    """(role, ADMM pruner holding the statistics of the linear's input, dense weight) for every pruned linear of the
    model's last block, calibrated on `nsamples` windows of `data` (seed 0); linears that read the same input share
    one pruner."""
    ckpt = Checkpoint(model)
    windows = calib_windows(data, model, ckpt.config.vocab_size, seqlen, nsamples, 0)
    device = torch.device("cpu")
    last = ckpt.config.n_layers - 1
    x = Activations((*windows.shape, ckpt.config.hidden_size), device)
    embed_windows(ckpt, windows, device, x, BATCH)
    pos = positions(ckpt.config, windows.shape[1]).to(device, torch.float32)
    linears = block_linears(ckpt, last)
    pruners: dict = {}
    w = {}
    for bid in range(last + 1):
        w = ckpt.load_block(bid, device, torch.float32)

        def tap(site, a: Tensor) -> None:
            if site not in pruners:
                pruners[site] = make_pruner("admm", a.shape[-1], device, sparsity, pattern, errors=False)
            pruners[site].add_batch(a)

        forward_block(ckpt, w, x, pos.of(bid), x, BATCH, device, tap=tap if bid == last else None)
    return [(role.value, pruners[site], w[(role, "weight")]) for role, (site, _) in linears.items()]


def timed(f: Callable[[], object]) -> tuple[float, object]:
    t = time.perf_counter()
    out = f()
    return time.perf_counter() - t, out


def factorization_rows(sites: list[tuple[str, ADMM, Tensor]]) -> list[str]:
    """One row per distinct input: the fixed-rho and the rho-schedule factorizations and one W-update of every
    linear reading it."""
    rows = []
    for p in dict.fromkeys(p for _, p, _ in sites):
        w = torch.cat([weight for _, q, weight in sites if q is p]).float()
        h, _, _ = p._factor(w.shape[0])
        a = h.clone()
        a.diagonal().add_(p.rho)
        chol, factor = timed(lambda: torch.linalg.cholesky(a))
        inverse, pinv = timed(lambda: torch.cholesky_inverse(factor))
        eig, (values, vectors) = timed(lambda: torch.linalg.eigh(h))
        trsm, _ = timed(lambda: torch.linalg.solve_triangular(
            factor, torch.linalg.solve_triangular(factor.mT, w, upper=True, left=False), upper=False, left=False))
        gemm, _ = timed(lambda: w @ pinv)
        eig_update, _ = timed(lambda: ((w @ vectors) / (values + p.rho)) @ vectors.T)
        names = "/".join(role for role, q, _ in sites if q is p)
        rows.append(f"{names:<22} {h.shape[0]:>6} {w.shape[0]:>6} {chol:>10.3f} {eig:>8.3f} {trsm:>10.3f} "
                    f"{eig_update:>9.3f} {inverse:>10.3f} {gemm:>7.3f}")
    return rows


class Jacobi:
    """Jacobi's preconditioner: the identity, H having a unit diagonal in ADMM's scaling."""

    def apply(self, r: Tensor, keep: Tensor) -> Tensor:
        return r * keep

    def select(self, rows: Tensor) -> None:
        pass


def obs_sweep(w0: Tensor, h: Tensor, mask: Tensor, blocksize: int = 128) -> Tensor:
    """SparseGPT's sweep with the mask given (scaled weights): each removed weight's error spread over the later
    columns through the upper Cholesky factor of H^-1, in column blocks with lazy updates."""
    u = h.clone()
    assert inverse_factor_(u) == 0
    wt, mt = w0.t().contiguous(), mask.t()
    for i1 in range(0, wt.shape[0], blocksize):
        i2 = min(i1 + blocksize, wt.shape[0])
        w1, u1, err = wt[i1:i2], u[i1:i2, i1:i2], torch.zeros(i2 - i1, wt.shape[1])
        for i in range(i2 - i1):
            err[i] = w1[i] * mt[i1 + i] / u1[i, i]
            w1[i + 1 :].addr_(u1[i, i + 1 :], err[i], alpha=-1.0)
            w1[i].masked_fill_(mt[i1 + i], 0.0)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1.0)
    return wt.t()


def candidates(sites: list[tuple[str, ADMM, Tensor]]) -> dict[str, tuple[float, float, float]]:
    """Candidate -> (seconds, layer error, the exact solve's layer error), summed over the block's linears."""
    out: dict[str, list[float]] = {}
    for _, p, weight in sites:
        h, scale, dead = p._factor(weight.shape[0])
        w0, start, mask = p._search(weight, scale, dead, None)
        results = {}

        def cg(limit: int, precondition: Callable[[Tensor], object] | None = None) -> Tensor:
            x = start.clone()
            p._solve_kept(x, w0, h, mask, limit, precondition)
            return x

        results["iterate as it is"] = (0.0, start)
        results["OBS sweep, mask fixed"] = timed(lambda: obs_sweep(w0, h, mask))
        for steps in STEPS:
            results[f"Jacobi CG, {steps} steps"] = timed(lambda: cg(steps, lambda keep: Jacobi()))
        for steps in STEPS:
            results[f"deflated PCG, {steps} steps"] = timed(lambda: cg(steps))
        results["exact"] = timed(lambda: cg(CG_MAX_ITERATIONS))
        exact = objective(results["exact"][1], w0, h)
        for name, (seconds, x) in results.items():
            acc = out.setdefault(name, [0.0, 0.0, 0.0])
            acc[0] += seconds
            acc[1] += objective(x, w0, h)
            acc[2] += exact
    return {name: (s, f, e) for name, (s, f, e) in out.items()}


def iteration_rows(sites: list[tuple[str, ADMM, Tensor]], exact: float) -> list[str]:
    """One row per iteration count: the seconds of the search and the default final solve over the block, and
    the layer error against `exact` (the default iterations' with the exact solve)."""
    rows = []
    default = sites[0][1].iterations
    for iterations in ITERATIONS:
        seconds = error = 0.0
        for _, p, weight in sites:
            p.iterations = iterations
            h, scale, dead = p._factor(weight.shape[0])
            t = time.perf_counter()
            w0, x, mask = p._search(weight, scale, dead, None)
            p._solve_kept(x, w0, h, mask, PCG_STEPS)
            seconds += time.perf_counter() - t
            error += objective(x, w0, h)
            p.iterations = default
        rows.append(f"{iterations:>10} {seconds:8.2f} {error / exact - 1:9.2%}")
    return rows


def objective(x: Tensor, w0: Tensor, h: Tensor) -> float:
    e = x - w0
    return float(dot(e @ h, e).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("demo", "mid"), default="demo")
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--pattern", default="unstructured")
    add_record_option(ap)
    args = ap.parse_args()
    pattern = Pattern.parse(args.pattern)
    sparsity = pattern.n / pattern.m if pattern.structured else args.sparsity
    work = Path(tempfile.mkdtemp(prefix="streamprune-admm-solve-"))
    try:
        if args.model == "demo":
            model = demo_model(None)
            data, seqlen, nsamples = model / "train.txt", SEQLEN, NSAMPLES
        else:
            shape, nsamples, seqlen, _ = SHAPES["mid"]
            model, data = work / "model", work / "calib.npy"
            make_checkpoint(model, shape, 2, torch.float16)
            np.save(data, np.random.default_rng(0).integers(0, shape.vocab, nsamples * seqlen * 2))
        sites = block_sites(model, data, seqlen, nsamples, sparsity, pattern)
        factorizations = factorization_rows(sites)
        results = candidates(sites)
        by_iterations = iteration_rows(sites, results["exact"][2])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    level = args.pattern if pattern.structured else f"{sparsity:.0%}"
    with recording(ap, args):
        print(f"{args.model} model, last block, {level}; CPU ({torch.get_num_threads()} threads); seconds")
        print(f"{'input read by':<22} {'d':>6} {'rows':>6} {'Cholesky':>10} {'eigh':>8} {'2 trsm':>10} "
              f"{'eig. upd.':>9} {'inverse':>10} {'GEMM':>7}")
        print("\n".join(factorizations))
        print(f"\n{'final weights':<28} {'seconds':>8} {'gap':>9}")
        for name, (seconds, f, exact) in results.items():
            print(f"{name:<28} {seconds:8.2f} {f / exact - 1:9.2%}")
        print(f"\n{'iterations':>10} {'seconds':>8} {'gap':>9}   (search and {PCG_STEPS} PCG steps; gap: against "
              f"{sites[0][1].iterations} iterations and the exact solve)")
        print("\n".join(by_iterations))


if __name__ == "__main__":
    main()
