"""Checkpoints published in block-scaled FP8 (DeepSeek-V3's layout): decoded on read, pruned, written back in FP8 or
dense, resumed; the refusals. The FP8 copies are made here, by a quantizer of the tests' own, from tiny random models
transformers saves; tiles of 16 x 16 (the published 128 x 128 would cover a tiny model in one) so that edge tiles
are cropped."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import streamprune
from streamprune.checkpoint import Checkpoint
from streamprune.cli import app
from streamprune.evaluate import logits
from tests import tiny
from tests.test_expert_pruning import tensors as load
from tests.test_resume import checkpoint_files, fail_writes_after

BLOCK = (16, 16)
ARGS = dict(nsamples=8, seqlen=32, seed=3)
QUANTIZED = ("self_attn.", "mlp.experts.", "mlp.shared_experts.", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantized(name: str, t: torch.Tensor) -> bool:
    return name.endswith(".weight") and t.dim() == 2 and any(q in name for q in QUANTIZED) and "norm" not in name


def spread(scale: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Per-tile values onto the weights they scale, the edge tiles cropped."""
    rows, cols = shape
    return scale.repeat_interleave(BLOCK[0], 0)[:rows].repeat_interleave(BLOCK[1], 1)[:, :cols]


def quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, scale per tile): scale = amax / 448 (the next power of two for e8m0; 1 for a zero tile)."""
    rows, cols = w.shape
    tiles = torch.zeros(math.ceil(rows / BLOCK[0]), math.ceil(cols / BLOCK[1]), dtype=torch.float64)
    for i in range(tiles.shape[0]):
        for j in range(tiles.shape[1]):
            tile = w[i * BLOCK[0]:(i + 1) * BLOCK[0], j * BLOCK[1]:(j + 1) * BLOCK[1]].double().abs()
            tiles[i, j] = float(tile.max()) / 448 if float(tile.max()) > 0 else 1.0
    scale = tiles.float()
    if scale_dtype == torch.float8_e8m0fnu:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    else:
        scale = scale.to(scale_dtype).float()
    q = (w.float() / spread(scale, w.shape)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale.to(scale_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float64 product, rounded once to the model's dtype."""
    return (q.double() * spread(scale.double(), q.shape)).to(dtype)


# compressed-tensors' float-quantized format with block strategy, as Mistral Large 3 is published
COMPRESSED_FP8 = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
                  "config_groups": {"group_0": {
                      "targets": ["Linear"], "format": "float-quantized",
                      "weights": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "block",
                                  "block_structure": list(BLOCK), "dynamic": False},
                      "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "group",
                                            "group_size": BLOCK[1], "dynamic": True}}},
                  "ignore": ["lm_head"]}


def to_fp8(src: Path, dst: Path, scale_dtype: torch.dtype, compressed: bool = False) -> Path:
    """`src` as DeepSeek-V3 is published: its attention and MLP linears float8 with `weight_scale_inv`, every other
    tensor as it was, config.json's quantization_config fp8; `compressed`: as Mistral Large 3 is, the scale named
    `weight_scale` and the config compressed-tensors' float-quantized one."""
    shutil.copytree(src, dst)
    for path in dst.glob("*.safetensors"):
        path.unlink()
    out = {}
    suffix = "weight_scale" if compressed else "weight_scale_inv"
    for name, t in load(src).items():
        if quantized(name, t):
            out[name], out[name.removesuffix("weight") + suffix] = quantize(t, scale_dtype)
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
    if compressed:
        qc = COMPRESSED_FP8
    if scale_dtype == torch.float8_e8m0fnu:
        qc["scale_fmt"] = "ue8m0"
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
    return dst


def dense_copy(fp8: Path, dst: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """An FP8 checkpoint dequantized by the tests' own decoder, quantization_config removed."""
    shutil.copytree(fp8, dst)
    for path in dst.glob("*.safetensors"):
        path.unlink()
    stored = load(fp8)
    out = {}
    for name, t in stored.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = stored.get(name.removesuffix("weight") + "weight_scale_inv")
        out[name] = t if scale is None else dequantize(t, scale, dtype)
    save_file(out, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def bf16(tmp_path_factory):
    return tiny.build(tmp_path_factory.mktemp("fp8") / "bf16", "deepseek-v3", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory, bf16):
    return to_fp8(bf16, tmp_path_factory.mktemp("fp8") / "fp8", torch.float32)


SCALES = [torch.float32, torch.bfloat16, torch.float8_e8m0fnu]


@pytest.mark.parametrize("scale_dtype", SCALES, ids=str)
def test_decoding_equals_a_float64_rederivation(tmp_path, bf16, scale_dtype):
    src = to_fp8(bf16, tmp_path / "fp8", scale_dtype)
    stored = load(src)
    ckpt = Checkpoint(src)
    names = [n for n in stored if n.endswith(".weight") and stored[n].dtype == torch.float8_e4m3fn]
    assert len(names) > 40 and names == sorted(ckpt.layout.encoded)
    cropped = 0
    for name in names:
        scale = stored[name.removesuffix("weight") + "weight_scale_inv"]
        assert scale.dtype == scale_dtype
        cropped += any(d % b for d, b in zip(stored[name].shape, BLOCK))
        got = ckpt.read(name)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, dequantize(stored[name], scale, torch.bfloat16)), name
    assert cropped > 10  # tiles cut by the edge are exercised


def test_minimax_names_the_format_float8_e4m3fn(tmp_path, fp8):
    """MiniMax-M2's config calls the same format `float8_e4m3fn` (and lists `modules_to_not_convert`)."""
    other = edit_fp8(fp8, tmp_path / "minimax", config=quant_config(
        fmt="float8_e4m3fn", modules_to_not_convert=["gate", "e_score_correction_bias", "lm_head"]))
    name = sorted(Checkpoint(fp8).layout.encoded)[0]
    assert Checkpoint(other).layout.encoded == Checkpoint(fp8).layout.encoded
    assert torch.equal(Checkpoint(other).read(name), Checkpoint(fp8).read(name))


def test_eval_equals_transformers_on_the_dequantized_copy(tmp_path, fp8, calib):
    copy = dense_copy(fp8, tmp_path / "dense")
    ids = torch.randint(0, tiny.VOCAB, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = tiny.hf_model(copy)(ids).logits
    torch.testing.assert_close(logits(fp8, ids), ref, atol=1e-4, rtol=0)
    assert streamprune.evaluate(fp8, calib, seqlen=32, nsamples=4).perplexity == pytest.approx(
        streamprune.evaluate(copy, calib, seqlen=32, nsamples=4).perplexity, rel=1e-6)


def test_pruned_fp8_is_the_dense_output_requantized(tmp_path, fp8, calib):
    """Written back in FP8 (the default for an FP8 input): every pruned linear 50% zeros, stored as float8 with its
    scales and the input's quantization_config; block 0 (whose solves read the same inputs in both runs) decodes to
    the dense-format run's weights re-quantized per tile, with exactly its zeros. Later blocks calibrate on what the
    FP8 output computes (its own re-quantized weights), so they are checked against their own decoding."""
    out, dense = tmp_path / "out", tmp_path / "dense"
    streamprune.prune(fp8, out, calib=calib, sequential=False, **ARGS)
    streamprune.prune(fp8, dense, calib=calib, sequential=False, format="dense", **ARGS)
    got, ref, given = load(out), load(dense), load(fp8)
    assert sorted(got) == sorted(given)
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    assert not any(n.endswith("weight_scale_inv") for n in ref)
    checked = 0
    for name, q in got.items():
        if q.dtype != torch.float8_e4m3fn:
            assert name.endswith("weight_scale_inv") or torch.equal(q, given[name]), name  # norms, router, embeddings
            continue
        scale = got[name.removesuffix("weight") + "weight_scale_inv"]
        decoded = dequantize(q, scale, torch.bfloat16)
        assert float((decoded == 0).float().mean()) == pytest.approx(0.5, abs=0.02), name
        assert ref[name].dtype == torch.bfloat16
        if name.startswith("model.layers.0."):
            q_ref, scale_ref = quantize(ref[name], torch.float32)
            assert torch.equal(scale, scale_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), name
            assert torch.equal(decoded == 0, ref[name] == 0), name
            checked += 1
    assert checked == 8  # block 0: q_a, q_b, kv_a, kv_b, o and its dense MLP's gate, up and down
    ids = torch.randint(0, tiny.VOCAB, (1, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = tiny.hf_model(dense_copy(out, tmp_path / "decoded"))(ids).logits
    torch.testing.assert_close(logits(out, ids), want, atol=1e-4, rtol=0)


def test_resume_of_an_fp8_output_is_byte_identical(tmp_path, fp8, calib, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "out"
    streamprune.prune(fp8, ref, calib=calib, **ARGS)
    fail_writes_after(monkeypatch, 2)  # the globals and block 0 written; block 1 fails
    with pytest.raises(streamprune.StreamPruneError):
        streamprune.prune(fp8, out, calib=calib, **ARGS)
    monkeypatch.undo()
    report = streamprune.prune(fp8, out, calib=calib, **ARGS)
    assert report.resumed_at_block == 1
    assert checkpoint_files(out) == checkpoint_files(ref)


def test_expert_removal_alone_copies_fp8_bit_for_bit(tmp_path, fp8, calib):
    """--sparsity 0 --prune-experts: the kept experts' float8 weights and scales as stored; with --format dense, the
    same weights decoded."""
    out, dense = tmp_path / "out", tmp_path / "dense"
    report = streamprune.prune(fp8, out, calib=calib, sparsity=0.0, prune_experts=0.5, **ARGS)
    streamprune.prune(fp8, dense, calib=calib, sparsity=0.0, prune_experts=0.5, format="dense", **ARGS)
    got, given, decoded = load(out), load(fp8), load(dense)
    block = report.experts[0]
    kept = [e["expert"] for e in block["experts"] if e["kept"]]
    prefix = f"model.layers.{block['block']}.mlp.experts."
    for k, x in enumerate(kept):
        for part in ("gate_proj.weight", "gate_proj.weight_scale_inv", "down_proj.weight"):
            assert torch.equal(got[f"{prefix}{k}.{part}"].view(torch.uint8),
                               given[f"{prefix}{x}.{part}"].view(torch.uint8)), part
        w, s = given[f"{prefix}{x}.up_proj.weight"], given[f"{prefix}{x}.up_proj.weight_scale_inv"]
        assert torch.equal(decoded[f"{prefix}{k}.up_proj.weight"], dequantize(w, s, torch.bfloat16))


def edit_fp8(src: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        stored = tensors(load(src))
        (dst / "model.safetensors").unlink()
        save_file(stored, dst / "model.safetensors")
    if config is not None:
        raw = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(raw)))
    return dst


NAME = "model.layers.1.self_attn.q_b_proj.weight"


def drop_scale(t):
    return {k: v for k, v in t.items() if k != NAME.removesuffix("weight") + "weight_scale_inv"}


def bad_scale_shape(t):
    scale = NAME.removesuffix("weight") + "weight_scale_inv"
    return {**t, scale: t[scale][:-1].contiguous()}


def quant_config(**changes):
    return lambda raw: {**raw, "quantization_config": {**raw["quantization_config"], **changes}}


@pytest.mark.parametrize("tensors, config, message", [
    (drop_scale, None, f"{NAME} is F8_E4M3 without its scale {NAME.removesuffix('weight')}weight_scale_inv"),
    (bad_scale_shape, None, f"{NAME.removesuffix('weight')}weight_scale_inv is F32 [4, 2], fp8 stores F32 [5, 2]"),
    (None, quant_config(quant_method="awq"), "quant_method 'awq'"),
    (None, quant_config(fmt="e5m2"), "fp8 weights in fmt 'e5m2' are not read; expected 'e4m3'"),
], ids=["no-scale", "scale-shape", "quant-method", "fmt"])
def test_bad_fp8_input_is_one_line_and_writes_nothing(tmp_path, fp8, calib, tensors, config, message):
    src = edit_fp8(fp8, tmp_path / "bad", tensors, config)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(src), str(out), "--calib", str(calib), "--nsamples", "4",
                                      "--seqlen", "32"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_rows_are_coded_a_slice_at_a_time_as_all_at_once():
    """Encoding and decoding go a few tile rows at a time (small temporaries beside a large linear): the same bytes
    as all rows at once, whatever the slice."""
    from streamprune.formats import Fp8BlockFormat

    w = (torch.randn(100, 50, generator=torch.Generator().manual_seed(7)) * 0.05).to(torch.bfloat16)
    w[w.abs() < 0.03] = 0
    whole, sliced = (Fp8BlockFormat(block=BLOCK, rows_at_once=n) for n in (4096, 32))
    a, b = whole.encode("x.weight", w), sliced.encode("x.weight", w)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    q_ref, scale_ref = quantize(w, torch.float32)
    assert torch.equal(a["x.weight"].view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(a["x.weight_scale_inv"], scale_ref)
    assert torch.equal(whole.decode("x.weight", a), sliced.decode("x.weight", a))
    assert torch.equal(sliced.decode("x.weight", a), dequantize(q_ref, scale_ref, torch.bfloat16))
    assert torch.equal(sliced.decode("x.weight", a) == 0, w == 0)


def test_compressed_tensors_fp8_blocks_read_and_written_as_stored(tmp_path, bf16, fp8, calib):
    """The same FP8 weights under compressed-tensors' names (`weight_scale`, a float-quantized config with block
    strategy, as Mistral Large 3 is published): read as the DeepSeek-V3 layout is, bit for bit; pruned, written back
    with the same names and config, its weights those of the DeepSeek-V3 layout's run."""
    ct = to_fp8(bf16, tmp_path / "ct", torch.float32, compressed=True)
    ours, theirs = Checkpoint(ct), Checkpoint(fp8)
    assert sorted(ours.layout.encoded) == sorted(theirs.layout.encoded)
    for name in ours.layout.encoded:
        assert torch.equal(ours.read(name), theirs.read(name)), name
    streamprune.prune(ct, tmp_path / "out", calib=calib, **ARGS)
    streamprune.prune(fp8, tmp_path / "ref", calib=calib, **ARGS)
    out, ref = Checkpoint(tmp_path / "out"), Checkpoint(tmp_path / "ref")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"] == COMPRESSED_FP8
    assert any(n.endswith(".weight_scale") for n in out.tensors) and not any(n.endswith("_inv") for n in out.tensors)
    for name in ref.layout.encoded:
        assert torch.equal(out.read(name), ref.read(name)), name
