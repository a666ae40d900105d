"""On a CUDA device: the attention of the block forward runs on a fused kernel and the GPU peak stays within
the plan (skipped without a GPU; `bench/gpu_check.sh` runs these)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import streamprune
from streamprune.plan import plan

pytestmark = pytest.mark.gpu


def grouped_query_model(path):
    """One LLaMA block with 64 query heads over 8 key/value heads: the math kernel would hold (8, 64, 2048, 2048)
    float32 scores per batch of 8 windows, 8.6 GB, far above the plan."""
    from bench.synth import Shape, make_checkpoint

    make_checkpoint(path, Shape("llama", 4096, 11008, 64, 8, vocab=1024), 1, torch.bfloat16)
    return path


def alibi_model(path):
    """One BLOOM block with 32 heads: its (1, 32, 2048, 2048) float32 ALiBi bias (512 MiB) is held once."""
    import transformers

    config = transformers.BloomConfig(vocab_size=1024, hidden_size=2048, n_layer=1, n_head=32)
    transformers.BloomForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("build", [grouped_query_model, alibi_model], ids=["gqa", "alibi"])
def test_gpu_peak_is_what_the_plan_says(tmp_path, build):
    model = build(tmp_path / "model")
    calib = tmp_path / "ids.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 1024, 8 * 2048 + 1))
    args = dict(method="wanda", nsamples=8, seqlen=2048, batch=8, device="cuda", offload_activations="device")
    predicted = plan(model, nsamples=8, seqlen=2048, batch=8, device="cuda", method="wanda",
                     offload_activations="device")
    assert predicted.batch == 8
    report = streamprune.prune(model, tmp_path / "out", calib=calib, **args)
    assert report.args["batch"] == 8
    measured = report.peak_gpu_bytes
    assert measured <= predicted.device_peak, (measured / 2**20, predicted.device_peak / 2**20)
    assert measured >= 0.5 * predicted.device_peak, (measured / 2**20, predicted.device_peak / 2**20)


def test_eval_gpu_peak_stays_within_its_budget(tmp_path):
    model = grouped_query_model(tmp_path / "model")
    data = tmp_path / "ids.npy"
    np.save(data, np.random.default_rng(1).integers(0, 1024, 8 * 2048))
    result = streamprune.evaluate(model, data, seqlen=2048, device="cuda", batch=8, max_gpu_memory=8 * 2**30)
    assert result.peak_gpu_bytes <= 0.9 * 8 * 2**30 and result.batch >= 1


def test_moe_gpu_peak_is_within_the_plan(tmp_path):
    """One Mixtral-layout block of 64 experts (805 MB of experts in bf16): experts stream one at a time, so the GPU
    holds one expert, never the block's 64."""
    from bench.synth import Shape, make_checkpoint

    model = tmp_path / "model"
    make_checkpoint(model, Shape("mixtral", 2048, 1024, 16, 8, vocab=1024, experts=64, topk=4), 1, torch.bfloat16)
    calib = tmp_path / "ids.npy"
    np.save(calib, np.random.default_rng(2).integers(0, 1024, 8 * 2048 + 1))
    predicted = plan(model, nsamples=8, seqlen=2048, batch=8, device="cuda", method="sparsegpt",
                     offload_activations="device")
    report = streamprune.prune(model, tmp_path / "out", calib=calib, method="sparsegpt", nsamples=8, seqlen=2048,
                               batch=8, device="cuda", offload_activations="device")
    one_expert = 3 * 2048 * 1024 * 2
    on_gpu = {what: nbytes for what, nbytes, where in predicted.consumers if where == "device"}
    assert on_gpu["routed expert on the GPU, dense and pruned"] == 2 * one_expert
    assert report.peak_gpu_bytes <= predicted.device_peak, (report.peak_gpu_bytes / 2**20, predicted.device_peak / 2**20)
