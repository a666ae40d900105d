"""Which way of compensating for removed experts? Candidates measured on `tinymoe` (bench/tinylm.py), in memory.

Each MoE block in order (its input the output of the blocks before it, as changed), the experts with the lowest
REAP scores on the calibration tokens are removed (25% and 50%), the router keeps the rows of the others, and then:

    plain       nothing else (what `--prune-experts` writes)
    merge       each removed expert's weights averaged into the kept expert most of its tokens now go to, weighted by
                router mass (the sum of their routing weights): M-SMoE's rule, without aligning the experts' neurons
    ls-greedy   the kept experts' down projections fitted in order, a token's last expert to what the dense output
                still lacks, rows weighted by g^2 (what `--compensate-experts` streams, one expert at a time)
    ls-jacobi   each kept expert's down projection fitted to its own output plus the block's whole error, rows by g:
                needs every kept expert's output first (a third read of the experts)
    ls-joint    every kept down projection solved jointly against the dense output: all of a block's experts at once

Calibration: NSAMPLES windows of SEQLEN tokens of the training text (seed 0); perplexity on the held-out text. The
rows are computed by this script's own small Mixtral MoE forward over transformers' attention; `plain` and
`ls-greedy` equal `streamprune run --prune-experts F [--compensate-experts]` (bench/expert_pruning.py).

    python bench/expert_compensation.py [--record]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import TINYMOE, build_tiny_lm, fixed_threads  # noqa: E402
from streamprune.calib import calib_windows, eval_windows, load_tokens  # noqa: E402

SEQ, NSAMPLES = 128, 64
CANDIDATES = ("plain", "merge", "ls-greedy", "ls-jacobi", "ls-joint")


class Moe(nn.Module):
    """A Mixtral MoE layer with its experts as plain tensors, which the candidates edit: router (E, D), gate and up
    (E, 2I, D), down (E, D, I); softmax over the logits, top k, renormalized, as transformers' Mixtral routes."""

    def __init__(self, router: Tensor, gate_up: Tensor, down: Tensor, k: int) -> None:
        super().__init__()
        self.router, self.gate_up, self.down, self.k = router, gate_up, down, k

    def route(self, m: Tensor) -> tuple[Tensor, Tensor]:
        """Each token's chosen experts and weights, (tokens, k) each."""
        p = torch.softmax(F.linear(m, self.router).float(), -1)
        w, chosen = torch.topk(p, self.k, -1)
        return chosen, (w / w.sum(-1, keepdim=True)).to(m.dtype)

    def hidden(self, j: int, x: Tensor) -> Tensor:
        g, u = F.linear(x, self.gate_up[j]).chunk(2, -1)  # (n, I) each
        return F.silu(g) * u

    def routed(self, m: Tensor) -> Tensor:
        """The routed experts' weighted sum, (tokens, D) -> (tokens, D)."""
        chosen, w = self.route(m)
        out = torch.zeros_like(m)
        for j in range(self.router.shape[0]):
            token, slot = torch.where(chosen == j)
            out.index_add_(0, token, F.linear(self.hidden(j, m[token]), self.down[j]) * w[token, slot, None])
        return out

    def forward(self, hs: Tensor) -> Tensor:
        return self.routed(hs.reshape(-1, hs.shape[-1])).view_as(hs)


def load(model_dir: Path) -> Any:
    """The model in float32, each MoE layer a `Moe`."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        layer.mlp = Moe(layer.mlp.gate.weight.data.clone(), experts.gate_up_proj.data.clone(),
                        experts.down_proj.data.clone(), model.config.num_experts_per_tok)
    return model


@torch.no_grad()
def moe_input(model: Any, windows: Tensor, bid: int) -> Tensor:
    """Block `bid`'s MoE input over every window, (tokens, D), through the blocks as changed so far."""
    seen = []
    hook = model.model.layers[bid].mlp.register_forward_pre_hook(
        lambda mod, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    for i in range(0, len(windows), 16):
        model(windows[i:i + 16])
    hook.remove()
    return torch.cat(seen)


@torch.no_grad()
def perplexity(model: Any, windows: Tensor) -> float:
    total, count = 0.0, 0
    for i in range(0, len(windows), 16):
        ids = windows[i:i + 16]
        logits = model(ids).logits
        total += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def reap(moe: Moe, m: Tensor) -> list[float]:
    """Each expert's REAP score: the mean over its tokens of g x ||f||."""
    chosen, w = moe.route(m)
    scores = []
    for j in range(moe.router.shape[0]):
        token, slot = torch.where(chosen == j)
        f = F.linear(moe.hidden(j, m[token]), moe.down[j])
        scores.append(float((w[token, slot] * f.norm(dim=-1)).sum() / max(1, token.numel())))
    return scores


def solve(H: Tensor, C: Tensor, damp: float = 0.01) -> Tensor:
    """C H^-1, H's diagonal raised by `damp` x its mean."""
    return torch.linalg.solve(H + damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype), C.T).T


def merge(moe: Moe, m: Tensor, keep: list[int]) -> None:
    """Each removed expert's weights averaged into the kept expert most of its tokens now go to, by router mass."""
    n = moe.router.shape[0]
    chosen, w = moe.route(m)
    mass = torch.stack([w[chosen == j].sum() for j in range(n)])
    now, _ = Moe(moe.router[keep], moe.gate_up, moe.down, moe.k).route(m)  # where the reduced router sends them
    total = mass[keep].clone()
    gate_up, down = moe.gate_up[keep] * total[:, None, None], moe.down[keep] * total[:, None, None]
    for r in (x for x in range(n) if x not in keep):
        token, _ = torch.where(chosen == r)
        target = torch.bincount(now[token].reshape(-1), minlength=len(keep)).argmax()
        gate_up[target] += mass[r] * moe.gate_up[r]
        down[target] += mass[r] * moe.down[r]
        total[target] += mass[r]
    moe.router, moe.gate_up, moe.down = moe.router[keep], gate_up / total[:, None, None], down / total[:, None, None]


def fit_greedy(moe: Moe, m: Tensor, dense: Tensor) -> None:
    """--compensate-experts: in order, a token's last expert fitted to what the dense output still lacks, the
    others to their own output; rows weighted by g^2."""
    chosen, w = moe.route(m)
    done = torch.zeros_like(dense)  # the fitted experts' share of each token's output so far
    for k in range(moe.router.shape[0]):
        token, slot = torch.where(chosen == k)
        g = w[token, slot].double()[:, None]
        h = moe.hidden(k, m[token]).double()
        own = h @ moe.down[k].double().T
        last = (chosen[token].max(-1).values == k)[:, None]
        target = torch.where(last, (dense[token] - done[token]) / g, own)
        fitted = solve((h * g**2).T @ h, (target * g**2).T @ h)
        moe.down[k] = fitted.float()
        done.index_add_(0, token, (h @ fitted.T) * g)


def fit_jacobi(moe: Moe, m: Tensor, dense: Tensor) -> None:
    """Each kept expert fitted to its own output plus the block's whole error, rows weighted by g: the error needs
    every kept expert's output before any is fitted."""
    chosen, w = moe.route(m)
    error = dense - moe.routed(m).double()
    for k in range(moe.router.shape[0]):
        token, slot = torch.where(chosen == k)
        g = w[token, slot].double()[:, None]
        h = moe.hidden(k, m[token]).double()
        target = h @ moe.down[k].double().T + error[token]
        moe.down[k] = solve((h * g).T @ h, (target * g).T @ h).float()


def fit_joint(moe: Moe, m: Tensor, dense: Tensor) -> None:
    """Every kept down projection solved at once against the dense output (all of the block's experts in memory)."""
    chosen, w = moe.route(m)
    E, width = moe.router.shape[0], moe.down.shape[2]
    features = torch.zeros(m.shape[0], E * width, dtype=torch.float64)  # (tokens, E x I): g h_k in expert k's slot
    for k in range(E):
        token, slot = torch.where(chosen == k)
        features[token, k * width:(k + 1) * width] += moe.hidden(k, m[token]).double() * w[token, slot, None].double()
    fitted = solve(features.T @ features, dense.T @ features, 1e-3)
    for k in range(E):
        moe.down[k] = fitted[:, k * width:(k + 1) * width].float()


FITS = {"ls-greedy": fit_greedy, "ls-jacobi": fit_jacobi, "ls-joint": fit_joint}


@torch.no_grad()
def run(how: str, fraction: float, windows: Tensor, evaluation: Tensor, model_dir: Path) -> float:
    """The held-out perplexity of the model with `fraction` of each block's experts removed, block by block, and
    compensated as `how` says."""
    model = load(model_dir)
    for bid, layer in enumerate(model.model.layers):
        moe = layer.mlp
        m = moe_input(model, windows, bid)
        dense = moe.routed(m).double()
        scores = reap(moe, m)
        n = len(scores)
        removed = sorted(range(n), key=lambda x: (scores[x], -x))[:math.floor(fraction * n)]
        keep = [x for x in range(n) if x not in removed]
        if how == "merge":
            merge(moe, m, keep)
            continue
        moe.router, moe.gate_up, moe.down = moe.router[keep], moe.gate_up[keep], moe.down[keep]
        if how in FITS:
            FITS[how](moe, m, dense)
    return perplexity(model, evaluation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None)
    add_record_option(ap)
    args = ap.parse_args()
    start = time.perf_counter()
    model_dir = build_tiny_lm(args.cache_dir, TINYMOE)
    windows = calib_windows(model_dir / "train.txt", model_dir, 10**9, SEQ, NSAMPLES, 0)
    ev = eval_windows(load_tokens(model_dir / "test.txt", model_dir, 10**9), SEQ)
    with fixed_threads():
        dense = perplexity(load(model_dir), ev)
        rows = {(frac, how): run(how, frac, windows, ev, model_dir) for frac in (0.25, 0.5) for how in CANDIDATES}
    with recording(ap, args, ignore=("cache_dir",)):
        print(f"{model_dir.name}: perplexity on held-out text ({SEQ}-token windows) after removing the REAP-lowest "
              f"experts of each block, by way of compensating (calibration {NSAMPLES} x {SEQ} tokens); dense "
              f"{dense:.2f}; in brackets the change from dense, and its ratio to plain removal's")
        print()
        print("| candidate | streams (one expert at a time, two reads) | 25% removed | 50% removed |")
        print("| --- | --- | ---: | ---: |")
        for how in CANDIDATES:
            cells = []
            for frac in (0.25, 0.5):
                p, base = rows[(frac, how)], rows[(frac, "plain")]
                cells.append(f"{p:.2f} ({p - dense:+.2f}, {(p - dense) / (base - dense):.2f}x)")
            streams = "yes" if how in ("plain", "ls-greedy") else "no"
            print(f"| {how} | {streams} | {cells[0]} | {cells[1]} |")
        print()
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
