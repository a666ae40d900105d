"""Byte-identical outputs across two versions of streamprune: a matrix of jobs run by each, every written file and
every perplexity compared.

The jobs cover dense families and Mixture-of-Experts, every method, sequential and not, 4-bit quantization written
dense and packed, OWL, `run --eval` (and --eval-dense), `eval`, sweeps with saved checkpoints, a resume after SIGKILL
(the run killed as it closes its Nth shard, then the same command again) and two gloo ranks under torchrun. Each
version runs the same jobs on the same tiny random models (built once, by the checkout that runs this script), from
its own source tree, in a process of its own with one thread.

    python bench/identical.py --against COMMIT      # COMMIT checked out in a temporary git worktree
    python bench/identical.py --tree OTHER_CHECKOUT

Compared per job: the bytes of every file written (a report's timings excepted: the report is compared through its
deterministic fields, the layers' rows without seconds, total sparsity, allocation, quantization and perplexities)
and each perplexity, exactly. Exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TIMED_FILES = {"streamprune_report.json", "sweep.json", "sweep.csv", "sweep.png", "streamprune_memory.csv"}
CALIB = dict(nsamples=6, seqlen=32)
EVAL = dict(eval_nsamples=3, eval_seqlen=48)
PACKED = dict(wbits=4, group_size=16, format="compressed-tensors")
VARIANTS = ("llama", "opt", "bloom", "gemma2", "mixtral", "qwen2-moe", "qwen3-moe")

# (name, model, options of `prune`); "calib" and "eval" stand for the data file
RUNS: list[tuple[str, str, dict[str, Any]]] = [
    ("llama-sparsegpt", "llama", dict(calib=True)),
    ("llama-sparsegpt-noseq", "llama", dict(calib=True, sequential=False)),
    ("llama-sparsegpt-2of4", "llama", dict(calib=True, pattern="2:4")),
    ("llama-admm", "llama", dict(calib=True, method="admm", sparsity=0.6)),
    ("llama-wanda-errors", "llama", dict(calib=True, method="wanda", layer_errors=True)),
    ("llama-magnitude", "llama", dict(method="magnitude")),
    ("llama-wbits4-dense", "llama", dict(calib=True, wbits=4, group_size=16)),
    ("llama-wbits4-packed", "llama", dict(calib=True, **PACKED)),
    ("llama-wanda-owl", "llama", dict(calib=True, method="wanda", allocation="owl", sparsity=0.7)),
    ("llama-magnitude-owl-eval", "llama", dict(calib=True, method="magnitude", allocation="owl", eval=True)),
    ("llama-eval-dense", "llama", dict(calib=True, eval=True, eval_dense=True)),
    ("llama-disk", "llama", dict(calib=True, offload_activations="disk", eval=True)),
    ("opt-sparsegpt", "opt", dict(calib=True, eval=True)),
    ("bloom-noseq", "bloom", dict(calib=True, sequential=False)),
    ("gemma2-wanda-eval", "gemma2", dict(calib=True, method="wanda", eval=True, eval_dense=True)),
    ("mixtral-sparsegpt-eval", "mixtral", dict(calib=True, eval=True, eval_dense=True)),
    ("mixtral-noseq-eval", "mixtral", dict(calib=True, sequential=False, eval=True, eval_dense=True)),
    ("mixtral-packed", "mixtral", dict(calib=True, **PACKED)),
    ("mixtral-admm", "mixtral", dict(calib=True, method="admm")),
    ("qwen2moe-wanda-all", "qwen2-moe", dict(calib=True, method="wanda", moe_calibration="all", eval=True)),
    ("qwen2moe-noseq", "qwen2-moe", dict(calib=True, sequential=False)),
    ("qwen3moe-magnitude-eval", "qwen3-moe", dict(method="magnitude", eval=True, eval_dense=True)),
]
SWEEP_POINTS = dict(methods=["sparsegpt", "wanda", "magnitude"], sparsities=[0.5], patterns=["2:4"])
SWEEPS: list[tuple[str, str, dict[str, Any]]] = [
    ("sweep-llama-saved", "llama", dict(save=True)),
    ("sweep-mixtral-saved", "mixtral", dict(save=True)),
    ("sweep-qwen2moe-noseq", "qwen2-moe", dict(sequential=False)),
]
EVALS = [("eval-llama", "llama"), ("eval-mixtral", "mixtral"), ("eval-llama-packed-output", "run:llama-wbits4-packed")]
# command lines run in a process of their own: (name, arguments, ranks, kill at the Nth shard close or 0); {models},
# {data} and {out} stand for the models' folder, the data file and the job's output folder
RUN = ["run", "{models}/{model}", "{out}", "--calib", "{data}", "--nsamples", "6", "--seqlen", "32", "--device", "cpu",
       "--eval", "{data}", "--eval-nsamples", "4", "--eval-seqlen", "48"]
SWEEP = ["sweep", "{models}/{model}", "{out}", "--calib", "{data}", "--eval", "{data}", "--nsamples", "6", "--seqlen",
         "32", "--eval-nsamples", "3", "--eval-seqlen", "48", "--device", "cpu", "--methods", "sparsegpt,wanda",
         "--sparsities", "0.5", "--save-dir", "{out}/points"]
COMMANDS: list[tuple[str, list[str], int, int]] = [
    ("resume-llama-killed", [*RUN, "--eval-dense"], 1, 3),
    ("resume-mixtral-killed", RUN, 1, 3),
    ("resume-mixtral-packed-killed", [*RUN, "--wbits", "4", "--group-size", "16", "--format", "compressed-tensors"],
     1, 2),
    ("resume-sweep-mixtral-killed", SWEEP, 1, 5),
    ("ranks2-llama", RUN, 2, 0),
    ("ranks2-mixtral-eval", [*RUN, "--eval-dense"], 2, 0),
]
MODEL_OF = {"resume-llama-killed": "llama", "ranks2-llama": "llama"}  # the others: mixtral

# The process that runs a command line, killed with SIGKILL as it closes its Nth shard file (the class is patched
# where it is defined, so every module that imported it sees the patch; a module found outside the tree, e.g. through
# an editable install of another checkout, is not the tree's).
KILLER = """
import importlib, os, signal, sys
from pathlib import Path
tree = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(tree))
kill_at = int(sys.argv[2])
for name in ("streamprune.tensorfile", "streamprune.checkpoint"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    if hasattr(module, "ShardFile") and Path(module.__file__).resolve().is_relative_to(tree):
        real, calls = module.ShardFile.close, [0]
        def close(self, real=real, calls=calls):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self)
        module.ShardFile.close = close
        break
from streamprune.cli import main
sys.argv = ["streamprune", *sys.argv[3:]]
main()
"""


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files(folder: Path) -> dict[str, str]:
    """Every file under `folder` but the timed ones, by relative path: its sha256."""
    return {str(p.relative_to(folder)): digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in TIMED_FILES}


def report_fields(folder: Path) -> dict[str, Any]:
    """The deterministic fields of a run's report: layers without their seconds, sparsity, allocation, quantization,
    perplexities."""
    raw = json.loads((folder / "streamprune_report.json").read_text())
    layers = [{k: v for k, v in lr.items() if k != "seconds"} for lr in raw["layers"]]
    keys = ("total_sparsity", "block_sparsity", "allocation", "quantization", "perplexity", "dense_perplexity", "eval")
    return {"layers": layers, **{k: raw.get(k) for k in keys}}


def sweep_fields(folder: Path) -> dict[str, Any]:
    raw = json.loads((folder / "sweep.json").read_text())
    points = [{k: p[k] for k in ("method", "pattern", "sparsity", "perplexity", "total_sparsity")} for p in raw["points"]]
    return {"dense_perplexity": raw["dense_perplexity"], "points": points, "reads": [r["reads"] for r in raw["reads"]]}


def record(tree: Path, models: Path, data: Path, work: Path) -> dict[str, Any]:
    """Every job of the matrix run by the streamprune of `tree` (imported in this process): what each wrote."""
    sys.path.insert(0, str(tree))
    import torch

    import streamprune
    from streamprune.evaluate import evaluate

    try:
        from streamprune.pipeline import sweep
    except ImportError:  # where the sweep lived before the block loop was redesigned
        from streamprune.sweep import sweep

    assert Path(streamprune.__file__).resolve().is_relative_to(tree.resolve()), streamprune.__file__
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for name, model, opts in RUNS:
        kwargs = {k: v for k, v in opts.items() if k not in ("calib", "eval")}
        if opts.get("calib"):
            kwargs.update(calib=data, **CALIB)
        if opts.get("eval"):
            kwargs.update(eval=data, **EVAL)
        streamprune.prune(models / model, work / name, device="cpu", **kwargs)
        out[name] = {"files": files(work / name), "report": report_fields(work / name)}
    for name, model, opts in SWEEPS:
        save = work / (name + "-points") if opts.get("save") else None
        sweep(models / model, work / name, save_dir=save, calib=data, eval=data, device="cpu",
              sequential=opts.get("sequential", True), **CALIB, **EVAL, **SWEEP_POINTS)
        out[name] = {"files": files(work / name) | ({} if save is None else
                                                    {f"points/{k}": v for k, v in files(save).items()}),
                     "report": sweep_fields(work / name)}
        if save is not None:
            for point in sorted(save.iterdir()):
                out[name]["report"][point.name] = report_fields(point)
    for name, model in EVALS:
        folder = work / model.removeprefix("run:") if model.startswith("run:") else models / model
        out[name] = {"files": {}, "report": {"perplexity": evaluate(folder, data, seqlen=48, nsamples=3, device="cpu").perplexity}}
    return out


def run_commands(tree: Path, models: Path, data: Path, work: Path) -> dict[str, Any]:
    """The command lines of COMMANDS run by `tree`'s streamprune, each in a process of its own (cwd: the tree)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
    out: dict[str, Any] = {}
    for name, template, ranks, kill_at in COMMANDS:
        dst = work / name
        args = [a.format(models=models, data=data, out=dst, model=MODEL_OF.get(name, "mixtral")) for a in template]
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                   "-m", "streamprune", *args]
        else:
            cmd = [sys.executable, "-m", "streamprune", *args]
        if kill_at:
            killed = subprocess.run([sys.executable, "-c", KILLER, str(tree), str(kill_at), *args], cwd=tree,
                                    env=env, capture_output=True, text=True)
            if killed.returncode != -signal.SIGKILL:
                raise SystemExit(f"{name}: the run was not killed (exit {killed.returncode}): {killed.stderr[-2000:]}")
            partial = sorted(str(p.relative_to(dst)) for p in dst.rglob("*.safetensors*"))
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{name}: exit {done.returncode}: {done.stderr[-3000:]}")
        sweep = args[0] == "sweep"
        out[name] = {"files": files(dst), "report": sweep_fields(dst) if sweep else report_fields(dst)}
        if kill_at:
            result = json.loads((dst / ("sweep.json" if sweep else "streamprune_report.json")).read_text())
            out[name]["report"] |= {"killed_with": partial, "resumed_at_block": result["resumed_at_block"]}
    return out


def build_inputs(folder: Path) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT))
    from tests import tiny

    for variant in VARIANTS:
        tiny.build(folder / "models" / variant, variant)
    data = folder / "data.txt"
    data.write_text(tiny.sample_text(15000))
    return folder / "models", data


def run_tree(tree: Path, models: Path, data: Path, work: Path, manifest: Path) -> None:
    """`record` and `run_commands` for `tree`, in a process of its own, into `manifest`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "record", "--tree", str(tree), "--models", str(models),
           "--data", str(data), "--work", str(work), "--manifest", str(manifest)]
    subprocess.run(cmd, check=True, env=env, cwd=tree)


def compare(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str]) -> int:
    """Print one row per job; the number of jobs that differ."""
    bad = 0
    width = max(map(len, a | b))
    print(f"{'job':<{width}}  files  tensors/report  result")
    for job in sorted(a.keys() | b.keys()):
        if job not in a or job not in b:
            print(f"{job:<{width}}  only in {names[0] if job in a else names[1]}")
            bad += 1
            continue
        fa, fb = a[job]["files"], b[job]["files"]
        diff_files = sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))
        same_report = a[job]["report"] == b[job]["report"]
        ok = not diff_files and same_report
        bad += not ok
        shards = sum(k.endswith(".safetensors") for k in fa)
        resumed = a[job]["report"].get("resumed_at_block")
        print(f"{job:<{width}}  {len(fa):>5}  {shards:>3} shards, report {'equal' if same_report else 'DIFFERS'}  "
              f"{'identical' if ok else 'DIFFERENT: ' + ', '.join(diff_files[:4])}"
              + ("" if resumed is None else f" (killed, resumed at block {resumed})"))
    return bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd")
    rec = sub.add_parser("record", help="(internal) run the matrix with the streamprune of --tree")
    for flag in ("--tree", "--models", "--data", "--work", "--manifest"):
        rec.add_argument(flag, type=Path, required=True)
    parser.add_argument("--against", help="a commit of this repository to compare with (checked out in a worktree)")
    parser.add_argument("--tree", type=Path, help="another checkout to compare with")
    parser.add_argument("--keep", type=Path, help="keep the outputs and manifests in this folder")
    args = parser.parse_args(argv)
    if args.cmd == "record":
        result = record(args.tree, args.models, args.data, args.work)
        result |= run_commands(args.tree, args.models, args.data, args.work)
        args.manifest.write_text(json.dumps(result, indent=1, sort_keys=True))
        return 0
    if (args.against is None) == (args.tree is None):
        parser.error("give one of --against COMMIT or --tree DIR")
    folder = Path(tempfile.mkdtemp(prefix="streamprune-identical-")) if args.keep is None else args.keep
    folder.mkdir(parents=True, exist_ok=True)
    other = args.tree
    try:
        if args.against is not None:
            other = folder / "other-tree"
            subprocess.run(["git", "worktree", "add", "--detach", "--force", str(other), args.against], cwd=ROOT,
                           check=True, capture_output=True)
        models, data = build_inputs(folder)
        manifests = []
        for label, tree in (("other", other), ("this", ROOT)):
            print(f"running the matrix with {tree} ...", flush=True)
            work = folder / f"out-{label}"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            run_tree(tree, models, data, work, folder / f"{label}.json")
            manifests.append(json.loads((folder / f"{label}.json").read_text()))
        names = (args.against or str(args.tree), "this checkout")
        bad = compare(*manifests, names)
        jobs = len(manifests[0].keys() | manifests[1].keys())
        print(f"{jobs - bad} of {jobs} jobs identical ({names[0]} against {names[1]})")
        return 1 if bad else 0
    finally:
        if args.against is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, capture_output=True)
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
