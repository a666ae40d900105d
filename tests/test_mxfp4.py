"""MXFP4 (formats.Mxfp4Format) as gpt-oss is published: a tiny gpt-oss whose experts the tests' own float64 quantizer
encodes (blocks and scales fused over the experts, gate and up rows interleaved), read against transformers' own
decoder and its dequantizing loader, written back, resumed, cut by expert removal, and refused when malformed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import streamprune
from streamprune.checkpoint import Checkpoint
from streamprune.evaluate import evaluate, logits
from streamprune.formats import Mxfp4Format
from tests import tiny, tolerance
from tests.test_bad_input import assert_names, fail
from tests.test_resume import checkpoint_files, fail_writes_after

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
ARGS = dict(nsamples=8, seqlen=48)


def reference_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 of `w` (..., out, in) in float64, value by value: each 32 inputs share 2^(floor(log2(amax)) - 2), each
    value the nearest e2m1 magnitude (a tie: the even code), at most 6, its sign in bit 3 (none for zero); two codes a
    byte, the lower nibble first."""
    *lead, rows, cols = w.shape
    v = w.double().reshape(-1, cols // 32, 32)
    codes = torch.zeros(v.shape, dtype=torch.int64)
    scales = torch.zeros(v.shape[:2], dtype=torch.int64)
    for r in range(v.shape[0]):
        for g in range(v.shape[1]):
            block = v[r, g]
            amax = float(block.abs().max())
            e = math.floor(math.log2(amax)) - 2 if amax > 0 else -127
            scales[r, g] = min(max(e + 127, 0), 254)
            for i, x in enumerate((block / 2.0 ** (int(scales[r, g]) - 127)).tolist()):
                m = min(abs(x), 6.0)
                best = min(range(8), key=lambda c: (abs(E2M1[c] - m), c % 2))
                codes[r, g, i] = best + (8 if x < 0 and best > 0 else 0)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed.reshape(*lead, rows, cols // 32, 16), scales.to(torch.uint8).reshape(*lead, rows, cols // 32)


def reference_decode(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float64 values of MXFP4 blocks and scales, (..., out, in)."""
    lut = torch.tensor(E2M1 + [-x for x in E2M1], dtype=torch.float64)
    codes = torch.stack((blocks & 15, blocks >> 4), dim=-1).long()  # (..., groups, 16, 2)
    values = lut[codes].reshape(*scales.shape, 32) * torch.exp2(scales.double() - 127)[..., None]
    return values.reshape(*scales.shape[:-1], -1)


def as_mxfp4(src: Path, dst: Path) -> Path:
    """`src` (a gpt-oss in bf16) with its experts in MXFP4 as gpt-oss is published: `*_blocks` and `*_scales` per fused
    tensor (outputs first), encoded by `reference_encode`; the biases, attention and router in bf16."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = reference_encode(tensors.pop(name).transpose(1, 2))  # stored [E, in, out]: outputs first
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def mxfp4(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mxfp4")
    return as_mxfp4(tiny.build(root / "bf16", "gpt-oss", dtype=torch.bfloat16), root / "mxfp4")


def hf_dequantized(path: Path):
    """transformers' gpt-oss with the MXFP4 experts dequantized as it loads them, upcast to float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.bfloat16).float().eval()


def test_decoding_equals_transformers_decoder(mxfp4):
    """Each expert's gate, up and down as streamprune reads them equal transformers' convert_moe_packed_tensors of the
    same blocks and scales, bit for bit (gate the even outputs of gate_up, up the odd ones)."""
    ckpt, stored = Checkpoint(mxfp4), load_file(mxfp4 / "model.safetensors")
    assert len(ckpt.layout.encoded) == 3 * 4 * 3  # (gate, up, down) x experts x blocks
    for bid in range(ckpt.config.n_layers):
        prefix = f"model.layers.{bid}.mlp.experts."
        gate_up = convert_moe_packed_tensors(stored[prefix + "gate_up_proj_blocks"], stored[prefix + "gate_up_proj_scales"],
                                             dtype=torch.bfloat16)  # [E, in, out], as transformers' module holds it
        down = convert_moe_packed_tensors(stored[prefix + "down_proj_blocks"], stored[prefix + "down_proj_scales"],
                                          dtype=torch.bfloat16)
        for e in range(4):
            assert torch.equal(ckpt.read(f"{prefix}{e}.gate_proj.weight"), gate_up[e][:, 0::2].T)
            assert torch.equal(ckpt.read(f"{prefix}{e}.up_proj.weight"), gate_up[e][:, 1::2].T)
            assert torch.equal(ckpt.read(f"{prefix}{e}.down_proj.weight"), down[e].T)
            assert torch.equal(ckpt.read(f"{prefix}{e}.gate_proj.bias"), stored[prefix + "gate_up_proj_bias"][e, 0::2])


def test_eval_equals_transformers_dequantized(mxfp4, calib):
    ids = torch.randint(0, tiny.VOCAB, (2, 48), generator=torch.Generator().manual_seed(3))
    model = hf_dequantized(mxfp4)
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(logits(mxfp4, ids), ref, atol=tolerance.LOGITS_ATOL, rtol=0)
    ours = evaluate(mxfp4, calib, seqlen=48, nsamples=4).perplexity
    windows = ours_windows(mxfp4, calib)
    with torch.no_grad():
        theirs = math.exp(float(model(windows, labels=windows).loss))
    assert ours == pytest.approx(theirs, rel=tolerance.perplexity(4 * 47, theirs))


def ours_windows(model: Path, data: Path) -> torch.Tensor:
    from streamprune.calib import eval_windows, load_tokens

    return eval_windows(load_tokens(data, model, tiny.VOCAB), 48, 4)


def test_pruned_output_is_mxfp4_and_loads_in_transformers(tmp_path, mxfp4, calib):
    """Pruned at 50%, the experts written back in MXFP4 (the input's quantization_config kept), the rest bf16; loaded by
    transformers (dequantized) with streamprune's logits; block 0's experts (whose statistics both runs compute from
    the same dense block with --no-sequential) are the dense-format run's weights encoded, their zeros exactly the
    mask's."""
    out, dense = tmp_path / "out", tmp_path / "dense"
    streamprune.prune(mxfp4, out, calib=calib, sequential=False, **ARGS)
    streamprune.prune(mxfp4, dense, calib=calib, format="dense", sequential=False, **ARGS)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    assert {n for n in load_file(out / "model-00002-of-00004.safetensors") if "experts" in n} == \
        {f"model.layers.0.mlp.experts.{p}_{s}" for p in ("gate_up_proj", "down_proj") for s in ("blocks", "scales", "bias")}
    ids = torch.randint(0, tiny.VOCAB, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf_dequantized(out)(ids).logits
    torch.testing.assert_close(logits(out, ids), ref, atol=tolerance.LOGITS_ATOL, rtol=0)
    written, solved, fmt = Checkpoint(out), Checkpoint(dense), Mxfp4Format()
    for e in range(4):
        for p in ("gate", "up", "down"):
            name = f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"
            w, d = written.read(name), solved.read(name)
            assert torch.equal(w, fmt.decode("x", fmt.encode("x", d))), name
            assert bool((w[d == 0] == 0).all()) and float((d == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_encoding_equals_a_float64_rederivation():
    """Blocks of every kind (ties between e2m1 values, zeros, saturation, magnitudes far apart, an all-zero block):
    streamprune's codes and scales equal the float64 reference's, and decode to its values."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 128, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    w[1, :32] = torch.tensor(E2M1 * 4) * 0.25 + torch.tensor([0.125] * 32)  # halfway between neighbours: ties
    w[2, 32:64] = 0.0
    w[3, ::3] = 0.0
    w[4, 64:96] = torch.tensor([6.0, -5.0] * 16) * 2.0**-130  # tiny: the smallest scale
    fmt = Mxfp4Format(dtype=torch.float32)
    got = fmt.encode("w", w)
    blocks, scales = reference_encode(w)
    assert torch.equal(got["w_blocks"], blocks) and torch.equal(got["w_scales"], scales)
    assert torch.equal(fmt.decode("w", got).double(), reference_decode(blocks, scales))
    assert bool((fmt.decode("w", got)[w == 0] == 0).all())
    part = fmt.encode("w", w[:3])  # a few rows at a time, as all at once
    assert torch.equal(part["w_blocks"], got["w_blocks"][:3])


def test_resume_is_byte_identical(tmp_path, mxfp4, calib, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "out"
    streamprune.prune(mxfp4, ref, calib=calib, **ARGS)
    fail_writes_after(monkeypatch, 2)  # the globals and block 0: block 1 fails
    with pytest.raises(streamprune.StreamPruneError):
        streamprune.prune(mxfp4, out, calib=calib, **ARGS)
    monkeypatch.undo()
    assert streamprune.prune(mxfp4, out, calib=calib, **ARGS).resumed_at_block == 1
    assert checkpoint_files(out) == checkpoint_files(ref)


def test_expert_removal_slices_blocks_scales_and_biases(tmp_path, mxfp4, calib):
    """--prune-experts 0.5 --sparsity 0: the kept experts' blocks, scales and biases bit for bit, in order, the router's
    rows and bias cut, num_local_experts set; transformers loads it."""
    out = tmp_path / "out"
    report = streamprune.prune(mxfp4, out, calib=calib, sparsity=0.0, prune_experts=0.5, **ARGS)
    before, after = load_file(mxfp4 / "model.safetensors"), {}
    for path in out.glob("*.safetensors"):
        after.update(load_file(path))
    for block in report.experts:
        keep = [e["expert"] for e in block["experts"] if e["kept"]]
        prefix = f"model.layers.{block['block']}.mlp."
        for name in [n for n in before if n.startswith(prefix)]:
            assert torch.equal(after[name], before[name][keep]), name  # experts' tensors and the router's, cut
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    ids = torch.randint(0, tiny.VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_dequantized(out)(ids).logits
    torch.testing.assert_close(logits(out, ids), ref, atol=tolerance.LOGITS_ATOL, rtol=0)


def test_any_moe_written_with_mxfp4_experts(tmp_path, calib):
    """--format mxfp4 on a per-expert MoE (Qwen3-MoE): its routed experts in MXFP4 (`<weight>_blocks`, `_scales`), the
    attention dense; what eval reads back is what the run computed with."""
    src = tiny.build(tmp_path / "in", "qwen3-moe")
    report = streamprune.prune(src, tmp_path / "out", calib=calib, format="mxfp4", eval=calib, eval_nsamples=4,
                               eval_seqlen=48, **ARGS)
    stored = Checkpoint(tmp_path / "out").tensors
    assert "model.layers.0.mlp.experts.0.gate_proj.weight_blocks" in stored
    assert "model.layers.0.self_attn.q_proj.weight" in stored
    assert report.perplexity == pytest.approx(evaluate(tmp_path / "out", calib, seqlen=48, nsamples=4).perplexity,
                                              rel=1e-6)


def _edit(d: Path, edit) -> None:
    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _nan_scale(t: dict) -> None:
    t["model.layers.1.mlp.experts.down_proj_scales"][0, 0, 0] = 255


@pytest.mark.parametrize("breaker,expected", [
    (lambda d: _edit(d, lambda t: t.pop("model.layers.0.mlp.experts.gate_up_proj_scales")),
     ["missing 1 tensor(s)", "model.layers.0.mlp.experts.gate_up_proj_scales"]),
    (lambda d: _edit(d, lambda t: t.update({"model.layers.0.mlp.experts.down_proj_scales": torch.zeros(4, 64, 2,
                                                                                                      dtype=torch.uint8)})),
     ["model.layers.0.mlp.experts.down_proj_scales is U8 [4, 64, 2], mxfp4 stores U8 [4, 64, 1]"]),
    (lambda d: _edit(d, _nan_scale), ["model.layers.1.mlp.experts.down_proj_scales", "255 (NaN)"]),
], ids=["blocks-without-scales", "scales-shape", "nan-scale"])
def test_bad_mxfp4_refused(tmp_path, mxfp4, calib, breaker, expected):
    model = Path(shutil.copytree(mxfp4, tmp_path / "model"))
    breaker(model)
    out = tmp_path / "out"
    assert_names(fail("run", model, out, "--calib", calib, "--nsamples", "2", "--seqlen", "32"), *expected)
    assert not (out / "model.safetensors.index.json").exists()


def test_width_not_a_multiple_of_32_refused(tmp_path, calib):
    """--format mxfp4 on experts 48 wide (down reads 48 inputs): refused before anything is written."""
    src = tiny.build(tmp_path / "in", "mixtral")
    out = tmp_path / "out"
    assert_names(fail("run", src, out, "--calib", calib, "--format", "mxfp4", "--nsamples", "2", "--seqlen", "32"),
                 "48 input features are not a multiple of 32")
    assert not out.exists()
