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

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import TINYMOE, build_tiny_lm, fixed_threads  # noqa: E402
from streamprune.calib import calib_windows, eval_windows, load_tokens  # noqa: E402

SEQ, NSAMPLES = 128, 64
CANDIDATES = ("plain", "merge", "ls-greedy", "ls-jacobi", "ls-joint")


class Moe(nn.Module):
    def __init__(self, router, gu, down, k):
        super().__init__()
        self.router, self.gu, self.down, self.k = router, gu, down, k  # (E,D) (E,2I,D) (E,D,I)
    def route(self, m):
        p = torch.softmax(F.linear(m, self.router).float(), -1)
        w, idx = torch.topk(p, self.k, -1)
        return idx, (w / w.sum(-1, keepdim=True)).to(m.dtype)
    def hidden(self, j, x):
        g, u = F.linear(x, self.gu[j]).chunk(2, -1)
        return F.silu(g) * u
    def forward(self, hs):
        B, T, D = hs.shape
        m = hs.reshape(-1, D)
        idx, w = self.route(m)
        out = torch.zeros_like(m)
        for j in range(self.router.shape[0]):
            tok, slot = torch.where(idx == j)
            if tok.numel():
                out.index_add_(0, tok, F.linear(self.hidden(j, m[tok]), self.down[j]) * w[tok, slot, None])
        return out.view(B, T, D)

def load(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    for layer in model.model.layers:
        e = layer.mlp.experts
        layer.mlp = Moe(layer.mlp.gate.weight.data.clone(), e.gate_up_proj.data.clone(), e.down_proj.data.clone(), model.config.num_experts_per_tok)
    return model

@torch.no_grad()
def moe_input(model, windows, b):
    seen = []
    h = model.model.layers[b].mlp.register_forward_pre_hook(lambda mod, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    for i in range(0, len(windows), 16):
        model(windows[i:i+16])
    h.remove()
    return torch.cat(seen)

@torch.no_grad()
def ppl(model, ev):
    tot, n = 0.0, 0
    for i in range(0, len(ev), 16):
        lo = model(ev[i:i+16]).logits
        tot += F.cross_entropy(lo[:, :-1].reshape(-1, lo.shape[-1]), ev[i:i+16, 1:].reshape(-1), reduction="sum").item()
        n += ev[i:i+16, 1:].numel()
    return math.exp(tot / n)

def reap(moe, m):
    idx, w = moe.route(m)
    s = []
    for j in range(moe.router.shape[0]):
        tok, slot = torch.where(idx == j)
        f = F.linear(moe.hidden(j, m[tok]), moe.down[j])
        s.append(float((w[tok, slot] * f.norm(dim=-1)).sum() / max(1, tok.numel())))
    return s

def solve(H, C, damp=0.01):
    d = damp * H.diagonal().mean()
    return torch.linalg.solve(H + d * torch.eye(H.shape[0], dtype=H.dtype), C.T).T  # C H^-1

def compensate(moe, keep, m, how, dense_out):
    """moe already reduced (router rows keep)."""
    E = len(keep)
    idx, w = moe.route(m)
    m64 = m.double()
    t = dense_out.double()
    if how == "ls-greedy":
        acc = torch.zeros_like(t)
        last = idx.max(-1).values
        for k in range(E):
            tok, slot = torch.where(idx == k)
            g = w[tok, slot].double()
            h = moe.hidden(k, m[tok]).double()
            f = h @ moe.down[k].double().T
            islast = last[tok] == k
            tgt = torch.where(islast[:, None], (t[tok] - acc[tok]) / g[:, None], f)
            om = g ** 2
            H = (h * om[:, None]).T @ h
            C = (tgt * om[:, None]).T @ h
            Wn = solve(H, C)
            moe.down[k] = Wn.float()
            acc.index_add_(0, tok, (h @ Wn.T) * g[:, None])
    elif how == "ls-jacobi":  # exact e(x) = t - y'_0 (needs the reduced output first: not streamable in two reads)
        y0 = moe(m[None])[0].double()
        e = t - y0
        for k in range(E):
            tok, slot = torch.where(idx == k)
            g = w[tok, slot].double()
            h = moe.hidden(k, m[tok]).double()
            f = h @ moe.down[k].double().T
            tgt = f + e[tok]
            H = (h * g[:, None]).T @ h
            C = (tgt * g[:, None]).T @ h
            moe.down[k] = solve(H, C).float()
    elif how == "ls-joint":
        I = moe.down.shape[2]
        feats = torch.zeros(m.shape[0], E * I, dtype=torch.float64)
        for k in range(E):
            tok, slot = torch.where(idx == k)
            feats[tok, k * I:(k + 1) * I] += moe.hidden(k, m[tok]).double() * w[tok, slot, None].double()
        H = feats.T @ feats
        C = t.T @ feats
        W = solve(H, C, 1e-3)
        for k in range(E):
            moe.down[k] = W[:, k * I:(k + 1) * I].float()

def run(how, frac, windows, ev, model_dir):
    model = load(model_dir)
    for b, layer in enumerate(model.model.layers):
        moe = layer.mlp
        m = moe_input(model, windows, b)
        with torch.no_grad():
            dense = moe(m[None])[0]
            s = reap(moe, m)
            n = len(s)
            removed = sorted(range(n), key=lambda x: (s[x], -x))[:math.floor(frac * n)]
            keep = [x for x in range(n) if x not in removed]
            if how == "merge":
                idx, w = moe.route(m)
                mass = torch.zeros(n)
                for j in range(n):
                    tok, slot = torch.where(idx == j); mass[j] = w[tok, slot].sum()
                # each removed expert's tokens: where the reduced router sends them
                red = Moe(moe.router[keep], None, None, moe.k)
                ridx, _ = red.route(m)
                gu = moe.gu[keep].clone(); dn = moe.down[keep].clone(); tot = mass[keep].clone()
                gu *= tot[:, None, None]; dn *= tot[:, None, None]
                for r in removed:
                    tok, slot = torch.where(idx == r)
                    target = torch.bincount(ridx[tok].reshape(-1), minlength=len(keep)).argmax()
                    gu[target] += mass[r] * moe.gu[r]; dn[target] += mass[r] * moe.down[r]; tot[target] += mass[r]
                moe.gu, moe.down = gu / tot[:, None, None], dn / tot[:, None, None]
                moe.router = moe.router[keep]
            else:
                moe.router, moe.gu, moe.down = moe.router[keep], moe.gu[keep], moe.down[keep]
                if how != "plain":
                    compensate(moe, keep, m, how, dense)
    return ppl(model, ev)

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
        dense = ppl(load(model_dir), ev)
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
