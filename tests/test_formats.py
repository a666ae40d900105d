"""Output formats: the compressed-tensors pack-quantized writer against the compressed-tensors package (bit-exact
packing, scales and zero points), a quantized tiny llama written through the pipeline's shard path and loaded by
transformers, and the dense format's output unchanged."""

from __future__ import annotations

import json
from types import SimpleNamespace
from pathlib import Path

import pytest
import torch
from torch import Tensor

from streamprune.checkpoint import Checkpoint, read_tensor
from streamprune.writer import CheckpointSink, ShardWriter, block_meta, output_linears
from streamprune.errors import ArgumentError, CheckpointError
from streamprune.evaluate import logits
from streamprune.formats import CompressedTensorsFormat, Layout, format_of, make_format
from streamprune.pipeline import prune
from streamprune.pruners.quant import Grid, Quantized
from tests import tiny

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme  # noqa: E402


def rtn(w: Tensor, grid: Grid, fmt: CompressedTensorsFormat, dtype: torch.dtype) -> Quantized:
    """Round-to-nearest on `grid`, with scales as the format stores them for a model of `dtype`."""
    rows, cols = w.shape
    group = cols if grid.group_size == -1 else grid.group_size
    g = w.float().reshape(rows, cols // group, group)  # (rows, groups, group)
    top = 2**grid.bits - 1
    if grid.sym:
        scale = g.abs().amax(-1) / (2 ** (grid.bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (grid.bits - 1))
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = (hi - lo) / top
        zero = (-lo / scale).round().clamp(0, top)
    scale = fmt.round_scale(scale.clamp(min=1e-8), dtype)
    codes = (g / scale.unsqueeze(-1) + zero.unsqueeze(-1)).round().clamp(0, top)
    return Quantized(codes.reshape(rows, cols).to(torch.uint8), scale, zero.to(torch.uint8), grid)


def dequantized(q: Quantized, grid: Grid) -> Tensor:
    """The contract's float32 weight: (codes - zero[:, g]) * scale[:, g]."""
    rows, cols = q.codes.shape
    group = cols if grid.group_size == -1 else grid.group_size
    g = torch.arange(cols) // group
    return (q.codes.float() - q.zero.float()[:, g]) * q.scale[:, g]


def scheme(grid: Grid) -> QuantizationScheme:
    strategy = "channel" if grid.group_size == -1 else "group"
    args = QuantizationArgs(num_bits=grid.bits, type="int", symmetric=grid.sym, strategy=strategy,
                            group_size=None if grid.group_size == -1 else grid.group_size)
    return QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")


GRIDS = [Grid(4, 32, True), Grid(4, 32, False), Grid(4, -1, True), Grid(4, -1, False), Grid(8, 16, True),
         Grid(8, -1, False), Grid(2, 32, False), Grid(3, 16, True), Grid(3, 32, False)]


def grid_id(g: Grid) -> str:
    return f"{g.bits}b-{'channel' if g.group_size == -1 else f'g{g.group_size}'}-{'sym' if g.sym else 'asym'}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("grid", GRIDS, ids=grid_id)
def test_packing_matches_compressed_tensors(grid, dtype):
    fmt = CompressedTensorsFormat(grid)
    rows, cols = 13, 96  # rows not a multiple of 32 / bits: the zero points' packing pads along the output dim
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(grid.bits)).to(dtype)
    q = rtn(w, grid, fmt, dtype)
    name = "model.layers.0.mlp.up_proj.weight"
    mine = fmt.encode(name, dequantized(q, grid).to(dtype), q)
    assert {n: (t.dtype, tuple(t.shape)) for n, t in mine.items()} == fmt.tensors(name, dtype, (rows, cols))
    local = {n.removeprefix("model.layers.0.mlp.up_proj."): t for n, t in mine.items()}

    # compressed-tensors compresses the weight the run used, with the stored scale (and its signed zero point); in
    # float32, as its quantize in bfloat16 rounds w / scale to bfloat16 (8-bit codes above 64 would move)
    state = {"weight": fmt.decode(name, mine).float(), "weight_scale": q.scale.to(dtype)}
    if not grid.sym:
        state["weight_zero_point"] = (q.zero.int() - 2 ** (grid.bits - 1)).to(torch.int8)
    theirs = PackedQuantizationCompressor.compress(state, scheme(grid))
    assert set(theirs) == set(local)
    for key in local:
        assert theirs[key].dtype == local[key].dtype, key
        assert torch.equal(theirs[key], local[key]), key

    # and decompresses what the format wrote into what the format decodes, bit for bit
    back = PackedQuantizationCompressor.decompress(local, scheme(grid))["weight"]
    assert back.dtype == dtype
    assert torch.equal(back, fmt.decode(name, mine))
    # which is the contract's float32 weight, rounded once to the model's dtype
    assert torch.equal(fmt.decode(name, mine), dequantized(q, grid).to(dtype))


def test_packed_integers_and_nibble_order():
    """4 bits: eight codes per int32 word, the first in the lowest nibble; the zero points packed down the rows."""
    grid = Grid(4, -1, False)
    fmt = CompressedTensorsFormat(grid)
    codes = torch.arange(16, dtype=torch.uint8).repeat(8, 1)  # (8, 16): every row 0..15
    zero = torch.arange(8, dtype=torch.uint8)[:, None] + 3  # (8, 1): 3..10
    out = fmt.encode("l.weight", torch.zeros(8, 16), Quantized(codes, torch.ones(8, 1), zero, grid))
    words = out["l.weight_packed"]
    assert words.shape == (8, 2) and words.dtype == torch.int32
    assert words[0, 0].item() == 0x76543210 and words[0, 1].item() == 0xFEDCBA98 - 2**32
    assert out["l.weight_zero_point"].shape == (1, 1) and out["l.weight_zero_point"].item() == 0xA9876543 - 2**32
    assert torch.equal(out["l.weight_shape"], torch.tensor([8, 16]))


def test_refusals():
    with pytest.raises(ArgumentError, match="stores 2, 3, 4, 8 bits, not 5"):
        CompressedTensorsFormat(SimpleNamespace(bits=5, group_size=32, sym=True))  # the format checks on its own
    with pytest.raises(ArgumentError, match="pass --wbits"):
        make_format("compressed-tensors")
    grid = Grid(4, 48, True)
    fmt = CompressedTensorsFormat(grid)
    with pytest.raises(ArgumentError, match="64 input columns are not a multiple of the group size 48"):
        fmt.tensors("l.weight", torch.bfloat16, (8, 64))
    q = Quantized(torch.zeros(4, 48, dtype=torch.uint8), torch.full((4, 1), 0.1), torch.full((4, 1), 8), grid)
    with pytest.raises(ValueError, match="not representable in torch.bfloat16: round them with round_scale"):
        fmt.encode("l.weight", torch.zeros(4, 48, dtype=torch.bfloat16), q)
    with pytest.raises(CheckpointError, match="quant_method 'gptq'"):
        format_of({"quantization_config": {"quant_method": "gptq"}})


def quantize_checkpoint(src: Path, dst: Path, grid: Grid, format: str = "compressed-tensors") -> dict[str, Quantized]:
    """What a quantizing run writes, without the solver: each linear the pipeline prunes, rounded to the nearest
    point of `grid`, written through the format on the pipeline's own shard path (header first from
    `block_meta`, each tensor put as it is ready, config.json and the index by the sink's `finish`)."""
    ckpt = Checkpoint(src)
    fmt = make_format(format, grid)
    ct_fmt = CompressedTensorsFormat(grid)  # the scales as stored, whichever the format
    layout = Layout(fmt, frozenset(output_linears(ckpt)))
    sink = CheckpointSink(ckpt, dst, layout)
    dst.mkdir(parents=True, exist_ok=True)
    solved = {}
    for idx, bid in enumerate([None, *range(ckpt.config.n_layers)]):
        shard = sink.open(idx, block_meta(ckpt, bid, layout))
        for name in ckpt.stored_names(bid):
            w = read_tensor(ckpt.tensors[name])
            if name not in layout.encoded:
                shard.put(name, w)
                continue
            solved[name] = q = rtn(w, grid, ct_fmt, w.dtype)
            for part, t in fmt.encode(name, dequantized(q, grid).to(w.dtype), q).items():
                shard.put(part, t)
        shard.close([])
    sink.finish()
    return solved


def load_hf(path: Path, **kw):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


E2E_GRIDS = [Grid(4, 32, True), Grid(4, 32, False), Grid(4, -1, False), Grid(8, -1, True), Grid(2, 16, False)]


@pytest.mark.parametrize("grid", E2E_GRIDS, ids=grid_id)
def test_quantized_llama_loads_in_transformers(tmp_path, grid):
    """transformers (with compressed-tensors) computes the same logits from the written checkpoint as streamprune's
    block iterator reading it through the format. A symmetric checkpoint loads with a plain from_pretrained; an
    asymmetric one needs CompressedTensorsConfig(dequantize=True) with transformers 5.24 and compressed-tensors
    0.20.1 (the plain load refuses the packed zero points' shape, see docs/formats.md)."""
    from transformers import CompressedTensorsConfig

    src = tiny.build(tmp_path / "src", "llama")
    out = tmp_path / "out"
    quantize_checkpoint(src, out, grid)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "sparsity_config" not in config and config["ignore"] == ["lm_head"]
    parsed = QuantizationConfig.model_validate(config)  # the package reads it as written
    assert parsed.config_groups["group_0"].weights == scheme(grid).weights
    kw = {} if grid.sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = load_hf(out, **kw)
    ids = torch.randint(0, tiny.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(logits(out, ids), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("grid", [Grid(4, 32, True), Grid(4, 16, False), Grid(3, -1, False)], ids=grid_id)
def test_packed_integers_are_the_solved_codes(tmp_path, grid):
    """The written integers, unpacked by compressed-tensors, are the solver's codes and zero points; the stored
    scales are its (rounded) scales; what streamprune reads back, for eval and for a resumed run's replay through
    the run's output layout, is the contract's weight rounded once to the model's dtype."""
    from streamprune.stream import BlockStream

    src = tiny.build(tmp_path / "src", "llama", dtype=torch.bfloat16)
    out = tmp_path / "out"
    solved = quantize_checkpoint(src, out, grid)
    written = Checkpoint(out)
    assert written.layout.format.name == "compressed-tensors" and written.layout.encoded == set(solved)
    offset = 2 ** (grid.bits - 1)
    for name, q in solved.items():
        module = name.removesuffix(".weight")
        packed = read_tensor(written.tensors[f"{module}.weight_packed"])
        codes = unpack_from_int32(packed, grid.bits, q.codes.shape).int() + offset
        assert torch.equal(codes, q.codes.int()), name
        assert torch.equal(read_tensor(written.tensors[f"{module}.weight_scale"]).float(), q.scale), name
        if not grid.sym:
            zp = read_tensor(written.tensors[f"{module}.weight_zero_point"])
            assert torch.equal(unpack_from_int32(zp, grid.bits, q.zero.shape, packed_dim=0).int() + offset, q.zero.int())
        assert torch.equal(written.read(name), dequantized(q, grid).to(torch.bfloat16)), name
    # a resumed run replays its shards with the input checkpoint and its own output layout
    ckpt = Checkpoint(src)
    layout = Layout(CompressedTensorsFormat(grid), frozenset(output_linears(ckpt)))
    shards = {bid: out / ShardWriter(out, ckpt.config.n_layers + 1).shard_name(bid + 1) for bid in range(3)}
    for block in BlockStream(ckpt, torch.device("cpu"), range(3), shard_of=shards.__getitem__, layout=layout):
        for (param, b), name in ckpt.names.items():
            if b == block.bid:
                assert torch.equal(block.w[param], written.read(name)), name


def test_pack_quantized_size(tmp_path):
    """A 4-bit bfloat16 model's linears take at most 0.3 of their dense bytes (group 128: codes 0.5 byte, a bfloat16
    scale per 128 weights; asymmetric: a 4-bit zero point too)."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                      vocab_size=tiny.VOCAB, max_position_embeddings=128)
    torch.manual_seed(0)
    src = tmp_path / "src"
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(src)
    dense = Checkpoint(src)
    linear_bytes = sum(dense.tensors[n].nbytes for n in output_linears(dense))
    for grid in (Grid(4, 128, True), Grid(4, 128, False)):
        out = tmp_path / grid_id(grid)
        quantize_checkpoint(src, out, grid)
        written = Checkpoint(out)
        packed = sum(written.tensors[p].nbytes for n in written.layout.encoded for p in written.layout.stored(n))
        ratio = packed / linear_bytes
        print(f"{grid_id(grid)}: linears {packed} of {linear_bytes} dense bytes = {ratio:.4f}")
        assert ratio <= 0.3


def test_quantized_moe_reads_as_its_dense_twin(tmp_path):
    """A Mixtral's experts stored packed are read back, expert by expert, as the dense format stores the same
    quantized weights: the two checkpoints give the same logits, bit for bit."""
    src = tiny.build(tmp_path / "src", "mixtral", dtype=torch.bfloat16)
    grid = Grid(4, 16, False)
    quantize_checkpoint(src, tmp_path / "packed", grid)
    quantize_checkpoint(src, tmp_path / "dense", grid, format="dense")
    packed = Checkpoint(tmp_path / "packed")
    assert any(".experts." in n for n in packed.layout.encoded)
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"] + [f"model.layers.{i}.block_sparse_moe.gate" for i in (0, 1)]  # the routers
    assert (tmp_path / "dense" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    ids = torch.randint(0, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    assert torch.equal(logits(tmp_path / "packed", ids), logits(tmp_path / "dense", ids))


def test_run_refusals(tmp_path):
    src = tiny.build(tmp_path / "src", "llama")
    with pytest.raises(ArgumentError, match="pass --wbits"):
        prune(src, tmp_path / "a", method="magnitude", format="compressed-tensors")
    with pytest.raises(ArgumentError, match="format 'gguf' is not one of dense, compressed-tensors"):
        prune(src, tmp_path / "b", method="magnitude", format="gguf")


def packed_experts(src: Path, dst: Path, grid: Grid) -> Path:
    """`src` as Kimi-K2-Thinking is published: its routed experts packed (compressed-tensors, `grid`), every other
    linear dense, the quantization_config's `ignore` naming them."""
    from safetensors.torch import save_file

    quantize_checkpoint(src, dst, grid)
    packed, dense = Checkpoint(dst), Checkpoint(src)
    out = {}
    for name, info in packed.tensors.items():
        module = name.rsplit(".", 1)[0]
        if ".experts." in name or module + ".weight" not in packed.layout.encoded:
            out[name] = read_tensor(info)
        elif name.endswith(".weight_packed"):  # a linear outside the experts: dense, as the input stored it
            out[module + ".weight"] = read_tensor(dense.tensors[module + ".weight"])
    for path in dst.glob("*.safetensors*"):
        path.unlink()
    save_file(out, dst / "model.safetensors")
    config = json.loads((dst / "config.json").read_text())
    qc = config["quantization_config"]
    qc["ignore"] = sorted(set(qc["ignore"]) | {n.removesuffix(".weight") for n in packed.layout.encoded
                                                 if ".experts." not in n})
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_packed_experts_pruned_and_written_as_stored(tmp_path):
    """A checkpoint whose routed experts are packed int4 (Kimi-K2-Thinking's layout, here group 16): by default the
    experts are pruned and quantized again on the input's grid and written packed, every other linear pruned and
    written dense, the quantization_config kept; transformers computes the same logits from the output as streamprune.
    With --format dense every linear is written dense (the experts decoded, pruned, not quantized)."""
    from transformers import CompressedTensorsConfig

    src = tiny.build(tmp_path / "src", "mixtral", dtype=torch.bfloat16)
    kimi = packed_experts(src, tmp_path / "kimi", Grid(4, 16, True))
    given = Checkpoint(kimi)
    assert given.layout.encoded and all(".experts." in n for n in given.layout.encoded)
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny.sample_text(15000))
    out, dense = tmp_path / "out", tmp_path / "dense"
    report = prune(kimi, out, calib=calib, nsamples=8, seqlen=32)
    prune(kimi, dense, calib=calib, nsamples=8, seqlen=32, format="dense")
    written = Checkpoint(out)
    assert set(written.tensors) == set(given.tensors) and written.layout.encoded == given.layout.encoded
    assert json.loads((out / "config.json").read_text())["quantization_config"] == \
        json.loads((kimi / "config.json").read_text())["quantization_config"]
    for lr in report.layers:
        zeros = float((written.read(lr.name) == 0).float().mean())
        quantized = ".experts." in lr.name  # some kept weights round to 0 on the 4-bit grid
        assert 0.48 <= zeros <= (0.6 if quantized else 0.52), lr.name
        assert (lr.packed_bytes is not None) == quantized, lr.name
    assert report.quantization["group_size"] == 16 and report.quantization["weights"] == sum(
        lr.shape[0] * lr.shape[1] for lr in report.layers if ".experts." in lr.name)
    ids = torch.randint(0, tiny.VOCAB, (2, 24), generator=torch.Generator().manual_seed(4))
    # transformers keeps the dequantized experts (one 3-D tensor per block) in bfloat16: upcast, as streamprune computes
    model = load_hf(out, quantization_config=CompressedTensorsConfig(dequantize=True)).float()
    with torch.no_grad():
        ref = model(ids).logits
    torch.testing.assert_close(logits(out, ids), ref, atol=1e-5, rtol=0)
    twin = Checkpoint(dense)
    assert not twin.layout.encoded and "quantization_config" not in json.loads((dense / "config.json").read_text())
    assert all(float((twin.read(lr.name) == 0).float().mean()) == pytest.approx(0.5, abs=0.02) for lr in report.layers)


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
def test_quantized_run_loads_in_transformers(tmp_path, sym):
    """`streamprune run --wbits 4 --format compressed-tensors` on a bfloat16 model: transformers computes the same
    logits from it as `streamprune eval` reads; its packed integers, unpacked by compressed-tensors, dequantize to
    exactly the weights of the same run written dense (the values the run went on with)."""
    from transformers import CompressedTensorsConfig

    src = tiny.build(tmp_path / "src", "llama-gqa", dtype=torch.bfloat16)
    calib = tmp_path / "calib.txt"
    calib.write_text(tiny.sample_text(15000))
    args = dict(calib=calib, nsamples=8, seqlen=64, wbits=4, group_size=32, sym=sym)
    packed, dense = tmp_path / "packed", tmp_path / "dense"
    report = prune(src, packed, format="compressed-tensors", **args)
    prune(src, dense, **args)
    ids = torch.randint(0, tiny.VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    model = load_hf(packed, quantization_config=CompressedTensorsConfig(dequantize=True))
    with torch.no_grad():
        ref = model(ids).logits
    ours = logits(packed, ids)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(ours, logits(dense, ids))
    written, twin = Checkpoint(packed), Checkpoint(dense)
    offset = 2 ** 3
    for name in written.layout.encoded:
        module = name.removesuffix(".weight")
        shape = twin.tensors[name].shape
        codes = unpack_from_int32(read_tensor(written.tensors[f"{module}.weight_packed"]), 4, shape).int() + offset
        scale = read_tensor(written.tensors[f"{module}.weight_scale"]).float()
        if sym:
            zero = torch.full_like(scale, offset)
        else:
            zp = read_tensor(written.tensors[f"{module}.weight_zero_point"])
            zero = unpack_from_int32(zp, 4, scale.shape, packed_dim=0).float() + offset
        g = torch.arange(shape[1]) // 32
        value = ((codes.float() - zero[:, g]) * scale[:, g]).to(torch.bfloat16)
        assert torch.equal(value, twin.read(name)), name
        assert float((value == 0).float().mean()) >= 0.5, name  # pruned weights sit on the zero point
    assert report.args["format"] == "compressed-tensors" and report.fingerprint["args"]["format"] == "compressed-tensors"
    from streamprune.evaluate import evaluate
    from streamprune.plan import plan

    ppl = [evaluate(d, calib, seqlen=64, nsamples=4, device="cpu").perplexity for d in (packed, dense)]
    assert ppl[0] == ppl[1]  # `streamprune eval` reads the packed output as the dense one
    assert plan(packed, nsamples=4, seqlen=64, device="cpu").host_peak > 0  # and plans it (packed linears decoded)
