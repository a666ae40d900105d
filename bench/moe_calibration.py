"""MoE calibration: each expert's statistics from the tokens routed to it, or from every token?

Builds (or finds in its cache) the Mixtral-shaped model of bench/tinylm.py (`tinymoe`), checks that streamprune's
perplexity of it agrees with transformers', then prunes it with SparseGPT (50% unstructured and 2:4) and Wanda
(50%), each with `--moe-calibration routed` and `all`, for each calibration seed, plus magnitude (which reads no
statistics), and evaluates every result on the held-out text (the same windows for every row). Calibration:
NSAMPLES windows of SEQLEN tokens drawn from the training text with the seed. Every run computes its layers'
reconstruction errors (`layer_errors=True`), so that the per-expert figures come from the reports:

- routed tokens per expert (min / median / max over the blocks' experts),
- how many experts took the fallback path (fewer than `--moe-min-tokens` routed: every token's statistics),
- the mean relative reconstruction error of the expert linears. With `routed`, an expert's error is measured on
  the tokens routed to it; with `all`, on every token: the two are not measured on the same token sets, so the
  perplexity is the fair comparison between them.

Then the acceptance check of the MoE pruning: SparseGPT against magnitude on the same windows, per
(block, expert, role) of every expert that received tokens: how many rows, how many SparseGPT wins, the worst
ratio of the two errors. Runs on the model's training thread count (one).

    python bench/moe_calibration.py [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import TINYMOE, build_tiny_lm, fixed_threads  # noqa: E402
from streamprune.report import LayerReport, Report  # noqa: E402

SEQLEN = 128
NSAMPLES = 64
# (method, pattern): the settings compared under both --moe-calibration values
SOLVED = (("sparsegpt", "unstructured"), ("sparsegpt", "2:4"), ("wanda", "unstructured"))
MODES = ("routed", "all")


@dataclass
class Result:
    method: str
    pattern: str
    mode: str  # --moe-calibration ("-" for magnitude's rows, whose weights read no statistics)
    seed: int
    perplexity: float
    layers: list[LayerReport]

    @property
    def label(self) -> str:
        return f"{self.method} {'50%' if self.pattern == 'unstructured' else self.pattern}"

    def experts(self) -> list[LayerReport]:
        return [lr for lr in self.layers if lr.expert is not None]


def prune_and_eval(model: Path, work: Path, method: str, pattern: str, mode: str, seed: int) -> Result:
    out = work / f"{method}-{pattern.replace(':', 'of')}-{mode}-{seed}"
    report: Report = streamprune.prune(model, out, method=method, pattern=pattern, calib=model / "train.txt",
                                       nsamples=NSAMPLES, seqlen=SEQLEN, seed=seed, device="cpu", layer_errors=True,
                                       moe_calibration="routed" if mode == "-" else mode)
    ppl = streamprune.evaluate(out, model / "test.txt", seqlen=SEQLEN, device="cpu").perplexity
    shutil.rmtree(out)
    return Result(method, pattern, mode, seed, ppl, report.layers)


def routed_counts(result: Result) -> list[int]:
    """Calibration tokens routed to each (block, expert)."""
    per = {(lr.block, lr.expert): lr.routed_tokens for lr in result.experts()}
    return [n for n in per.values() if n is not None]


def fallbacks(result: Result) -> int:
    """Experts whose solve read every token because fewer than --moe-min-tokens were routed to them."""
    return len({(lr.block, lr.expert) for lr in result.experts() if (lr.statistics or "").startswith("all (")})


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def expert_error(result: Result) -> float:
    """Mean over experts of each expert's mean rel_error over its linears (gate, up, down)."""
    per: dict[tuple[int, int | None], list[float]] = {}
    for lr in result.experts():
        assert lr.rel_error is not None
        per.setdefault((lr.block, lr.expert), []).append(lr.rel_error)
    return mean([mean(v) for v in per.values()])


def other_error(result: Result) -> float:
    """Mean rel_error of the linears outside the experts (attention)."""
    return mean([lr.rel_error for lr in result.layers if lr.expert is None and lr.rel_error is not None])


def table(dense: float, results: list[Result]) -> str:
    head = (f"{'setting':<16} {'moe-calib':>9} {'seed':>4} {'ppl':>8} {'delta':>7}  {'routed tok/expert':>19} "
            f"{'fallback':>8} {'expert err':>10} {'attn err':>8}")
    lines = [head, f"{'dense':<16} {'':>9} {'':>4} {dense:>8.2f}"]
    for r in results:
        counts = routed_counts(r)
        spread = f"{min(counts)}/{statistics.median(counts):g}/{max(counts)}"
        lines.append(f"{r.label:<16} {r.mode:>9} {r.seed:>4} {r.perplexity:>8.2f} {r.perplexity - dense:>+7.2f}  "
                     f"{spread:>19} {fallbacks(r):>4}/{len(counts):<3} {expert_error(r):>10.4f} {other_error(r):>8.4f}")
    return "\n".join(lines)


def comparison(results: list[Result], seeds: list[int]) -> str:
    """routed against all, per setting and seed: the perplexity gap (the fair comparison) and the error gap."""
    by = {(r.label, r.mode, r.seed): r for r in results}
    lines = [f"{'setting':<16} {'seed':>4} {'ppl routed':>10} {'ppl all':>8} {'all-routed':>10}  "
             f"{'err routed':>10} {'err all':>8}"]
    for method, pattern in SOLVED:
        label = Result(method, pattern, "", 0, 0.0, []).label
        gaps = []
        for seed in seeds:
            r, a = by[(label, "routed", seed)], by[(label, "all", seed)]
            gaps.append(a.perplexity - r.perplexity)
            lines.append(f"{label:<16} {seed:>4} {r.perplexity:>10.2f} {a.perplexity:>8.2f} {gaps[-1]:>+10.2f}  "
                         f"{expert_error(r):>10.4f} {expert_error(a):>8.4f}")
        # how far one setting moves when only the calibration windows change
        moves = [abs(by[(label, m, s)].perplexity - by[(label, m, seeds[0])].perplexity) for m in MODES
                 for s in seeds[1:]]
        lines.append(f"{label:<16} mean all-routed {mean(gaps):+.2f} ppl"
                     + (f"; seed to seed, one setting moves by up to {max(moves):.2f}" if moves else ""))
    lines.append("err: mean over experts of each expert's mean rel_error (gate, up, down); 'routed' measures it on "
                 "the tokens routed to the expert, 'all' on every token: not the same token sets, so the perplexity "
                 "is the fair comparison")
    return "\n".join(lines)


def error_check(magnitude: Result, solved: Result) -> str:
    """SparseGPT's rel_error against magnitude's, per (block, expert, role) of the experts that received tokens in
    both runs. Each run measures its errors on its own inputs: the same calibration windows, but after the first
    pruned linear the activations (and so the routes) are those of each run's own pruned layers."""
    mag = {(lr.block, lr.expert, lr.role): lr for lr in magnitude.experts()}
    pairs = []
    for lr in solved.experts():
        ref = mag[(lr.block, lr.expert, lr.role)]
        if lr.routed_tokens and ref.routed_tokens and lr.rel_error is not None and ref.rel_error is not None:
            pairs.append((lr.rel_error / ref.rel_error, lr))
    wins = sum(ratio < 1 for ratio, _ in pairs)
    worst, row = max(pairs, key=lambda p: p[0])
    return (f"{solved.label} vs magnitude ({solved.mode}, seed {solved.seed}): {len(pairs)} expert rows with routed "
            f"tokens > 0, SparseGPT lower on {wins}; worst ratio {worst:.3f} (block {row.block} expert {row.expert} "
            f"{row.role}, {row.routed_tokens} tokens); mean ratio {mean([p[0] for p in pairs]):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="calibration seeds")
    add_record_option(ap)
    args = ap.parse_args()
    start = time.perf_counter()
    model = build_tiny_lm(args.cache_dir, TINYMOE)
    info = json.loads((model / "build_info.json").read_text(encoding="utf-8"))
    results: list[Result] = []
    with fixed_threads(), tempfile.TemporaryDirectory(prefix="streamprune-moe-") as tmp:
        work = Path(tmp)
        dense = streamprune.evaluate(model, model / "test.txt", seqlen=SEQLEN, device="cpu").perplexity
        for pattern in ("unstructured", "2:4"):
            results.append(prune_and_eval(model, work, "magnitude", pattern, "-", args.seeds[0]))
        for seed in args.seeds:
            for method, pattern in SOLVED:
                for mode in MODES:
                    results.append(prune_and_eval(model, work, method, pattern, mode, seed))
    with recording(ap, args, ignore=("cache_dir",)):
        print(f"model {model.name}: {info['params']:,} parameters, trained in {info['train_time_s']:.0f} s; perplexity "
              f"on held-out text: streamprune {dense:.3f}, transformers {info['test_ppl']:.3f}")
        print(f"perplexity on held-out text ({SEQLEN}-token windows; calibration {NSAMPLES} x {SEQLEN} tokens of the "
              "training text; delta from dense); per-expert figures from the reports: routed calibration tokens per "
              "expert min/median/max, experts on the fallback path (fewer than moe_min_tokens routed), mean rel_error "
              "of the expert linears and of the attention linears")
        print(table(dense, results))
        print()
        print("routed against all (the same windows per seed):")
        print(comparison(results, args.seeds))
        print()
        mags = {r.pattern: r for r in results if r.method == "magnitude"}
        for r in results:
            if r.method == "sparsegpt" and r.mode == "routed" and r.seed == args.seeds[0]:
                print(error_check(mags[r.pattern], r))
        print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
