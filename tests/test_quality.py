"""End to end on a small language model trained on real text (the demo model, bench/tinylm-v2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.demo import SEQLEN, run_demo
from bench.tinylm import demo_model
from streamprune.calib import eval_windows, load_tokens
from tests import tolerance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lm():
    return demo_model()


@pytest.fixture(scope="module")
def results(lm, tmp_path_factory):
    work = tmp_path_factory.mktemp("quality")
    return run_demo(lm, work, patterns=("unstructured",), keep=True), work


def test_sparsegpt_beats_wanda_beats_magnitude(results):
    ppl, _ = results
    dense = ppl[("dense", "")]
    increase = {m: ppl[(m, "unstructured")] - dense for m in ("magnitude", "wanda", "sparsegpt")}
    assert increase["sparsegpt"] < 0.5 * increase["magnitude"], ppl
    assert increase["wanda"] < increase["magnitude"], ppl


def test_pruned_output_reloads_in_transformers_with_the_same_perplexity(lm, results):
    from transformers import AutoModelForCausalLM

    ppl, work = results
    out = work / "sparsegpt-unstructured"
    windows = eval_windows(load_tokens(lm / "test.txt", out, 10**9), SEQLEN)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    nll = 0.0
    with torch.no_grad():
        for batch in windows.split(16):
            logits = model(batch).logits
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    hf = math.exp(nll / (windows.shape[0] * (SEQLEN - 1)))
    # transformers' float32 sums run over a batch of 16 windows (16 x 127 terms)
    assert ppl[("sparsegpt", "unstructured")] == pytest.approx(hf, rel=tolerance.perplexity(16 * (SEQLEN - 1), hf))
    assert (out / "streamprune_report.json").is_file()
