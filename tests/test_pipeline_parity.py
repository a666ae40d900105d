"""What each pruner is fed inside the streaming loop, checked against transformers and a float64 re-derivation.

streamprune prunes a tiny random model; then, block by block, the transformers model loaded from its
output (so the blocks before b hold streamprune's pruned weights, and block b sees the inputs
streamprune's block b saw) runs in float64 with block b's dense weights put back. Forward hooks on
block b's linears collect their inputs over the same calibration windows, and tests/reference.py
re-derives every linear's mask and weights from them. With --no-sequential one forward through the
dense block feeds every linear (the paper's order); sequentially, each stage's inputs are collected
after streamprune's pruned weights of the stages before it are installed in the block.

The reference follows streamprune's mask, so that a near-tie decided the other way by float noise
does not cascade; every mask disagreement must be such a near-tie, and few; the weights must agree
to float32 noise. Comparing block by block from the same inputs keeps that bound tight: over a whole
model the OBS sweep amplifies float noise from block to block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import streamprune
from streamprune.calib import calib_windows
from tests import reference, tiny

NSAMPLES, SEQLEN, BLOCKSIZE, SEED = 8, 64, 32, 0

# transformers' decoder blocks of each family, and their linears by the input they read, in pruning order
BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers", "phi3": "model.layers",
          "gemma2": "model.layers", "gemma3_text": "model.layers", "gemma3": "model.language_model.layers",
          "opt": "model.decoder.layers", "bloom": "transformer.h", "qwen3_5_text": "model.layers",
          "gemma4_text": "model.layers", "gemma4": "model.language_model.layers"}
LLAMA_STAGES = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
STAGES = {
    "llama": LLAMA_STAGES,
    "qwen2": LLAMA_STAGES,
    "qwen3": LLAMA_STAGES,
    "gemma2": LLAMA_STAGES,
    "gemma3_text": LLAMA_STAGES,
    "gemma3": LLAMA_STAGES,
    "phi3": (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    "opt": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
    "bloom": (("self_attention.query_key_value",), ("self_attention.dense",), ("mlp.dense_h_to_4h",),
              ("mlp.dense_4h_to_h",)),
    "qwen3_5_text": LLAMA_STAGES,  # its attention blocks (the q projection with the output gate's rows)
    # Gemma 4: its global blocks without v_proj where their values are the keys' projection; the per-layer inputs'
    # gate and projection where the model has them
    "gemma4_text": LLAMA_STAGES + (("per_layer_input_gate",), ("per_layer_projection",)),
    "gemma4": LLAMA_STAGES + (("per_layer_input_gate",), ("per_layer_projection",)),
}
# the linear-attention blocks' mixer (Gated DeltaNet): the input projections, then the output projection; the decay
# and rate projections (b, a) are copied as read (COPIED)
LINEAR_STAGES = {
    "qwen3_next": (("linear_attn.in_proj_qkvz",), ("linear_attn.out_proj",)),
    "qwen3_5_text": (("linear_attn.in_proj_qkv", "linear_attn.in_proj_z"), ("linear_attn.out_proj",)),
}
LINEAR_STAGES["qwen3_5_moe_text"] = LINEAR_STAGES["qwen3_5_text"]
COPIED = {"linear_attn.in_proj_ba", "linear_attn.in_proj_b", "linear_attn.in_proj_a",
          # DeepSeek sparse attention's indexer: it picks the keys, copied as routers are
          "self_attn.indexer.wq_b", "self_attn.indexer.wk", "self_attn.indexer.weights_proj"}


def block_stages(kind: str, block: torch.nn.Module, stages: tuple) -> tuple:
    """`stages` (attention's, then the MLP's) as block `block` has them: a linear-attention block's mixer instead."""
    if getattr(block, "block_type", None) == "linear_attention":
        return LINEAR_STAGES[kind] + stages[2:]
    present = {name for name, _ in block.named_modules()}  # Gemma 4's global blocks may have no v_proj
    stages = tuple(tuple(name for name in stage if name in present) for stage in stages)
    return tuple(stage for stage in stages if stage)

# Bounds measured for SparseGPT over model and window seeds 0-5 and 1 or 2 threads (the tests use seed 0):
# float32 noise, amplified by the OBS sweep, reaches 2.1e-5 on later blocks; on block 0 with --no-sequential
# at most 3.9e-6 in the cases below, though 1.3e-5 for BLOOM 2:4 at seed 3 (dense_4h_to_h: 256 inputs from
# 512 tokens); up to 6 mask disagreements per model (2 at seed 0), at relative score gaps up to 2.4e-4.
MAX_GAP = 1e-3  # relative score gap of a mask disagreement: a tie broken by float noise
MAX_FLIPS = 8  # disagreeing weights per model, out of 5e4 to 1.5e5
ATOL = {"sparsegpt": 5e-5, "wanda": 0.0}  # weights, against the reference following streamprune's mask
BLOCK0_ATOL = 1e-5  # block 0 with --no-sequential: the paper's algorithm on the dense model


@dataclass
class Row:
    """One linear: streamprune's written weight against the re-derivation from transformers' inputs."""

    block: int
    name: str
    flips: int  # weights whose removal the reference, at its selection point, decides the other way
    gap: float  # the largest relative score gap among them
    abs_diff: float  # max |written - reference|
    rel_diff: float  # abs_diff / max |reference|

    def __str__(self) -> str:
        return (f"block {self.block} {self.name:32} flips {self.flips:2d} (gap {self.gap:.1e})  "
                f"max abs {self.abs_diff:.2e}  rel {self.rel_diff:.2e}")


@torch.no_grad()
def linear_inputs(model, windows: torch.Tensor, linears: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The input of each linear over all calibration windows, (tokens, columns), from one forward."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in linears}
    hooks = [lin.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach()))
             for name, lin in linears.items()]
    try:
        model(windows, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: torch.cat([a.reshape(-1, a.shape[-1]) for a in acts]) for name, acts in seen.items()}


def rederive(method: str, pattern: str, W: torch.Tensor, x: torch.Tensor, follow: torch.Tensor,
             grid: tuple[int, int, bool] | None = None, written: torch.Tensor | None = None) -> reference.Selection:
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    if method == "sparsegpt":
        return reference.sparsegpt(W, reference.hessian(x), 0.5, BLOCKSIZE, nm=nm, follow=follow, grid=grid,
                                   follow_weight=written)
    return reference.wanda(W, x, 0.5, nm=nm, follow=follow)


def parity_rows(tmp_path: Path, calib: Path, variant: str, method: str, pattern: str, sequential: bool,
                grid: tuple[int, int, bool] | None = None) -> list[Row]:
    src = tiny.build(tmp_path / "in", variant)
    out = tmp_path / "out"
    quant = {} if grid is None else dict(wbits=grid[0], group_size=grid[1], sym=grid[2])
    streamprune.prune(src, out, method=method, pattern=pattern, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN,
                      seed=SEED, sequential=sequential, blocksize=BLOCKSIZE, device="cpu", **quant)
    windows = calib_windows(calib, src, tiny.VOCAB, SEQLEN, NSAMPLES, SEED)
    dense = {n: p.detach().clone() for n, p in tiny.hf_model(src).named_parameters()}
    model = tiny.hf_model(out)
    written = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.double()
    kind = model.config.model_type
    rows = []
    for b, block in enumerate(model.get_submodule(BLOCKS[kind])):
        prefix = f"{BLOCKS[kind]}.{b}."
        stages = block_stages(kind, block, STAGES[kind])
        linears = {name for name, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)}
        assert linears - COPIED == {name for stage in stages for name in stage}, linears  # every linear compared
        for name in linears & COPIED:  # copied bit for bit
            assert torch.equal(written[prefix + name + ".weight"], dense[prefix + name + ".weight"]), name
        with torch.no_grad():
            for stage in stages:
                for name in stage:
                    block.get_submodule(name).weight.copy_(dense[prefix + name + ".weight"])
        # --no-sequential: every linear fed by one forward through the dense block; else stage by stage
        for group in [stages] if not sequential else [[stage] for stage in stages]:
            inputs = linear_inputs(model, windows, {stage[0]: block.get_submodule(stage[0]) for stage in group})
            for stage in group:
                for name in stage:
                    got = written[prefix + name + ".weight"].double()  # its zeros are the mask under test
                    ref = rederive(method, pattern, dense[prefix + name + ".weight"], inputs[stage[0]], got == 0, grid,
                                   got if grid else None)
                    flips, gap = ref.flips()
                    diff = float((got - ref.weight).abs().max())
                    rows.append(Row(b, name, flips, gap, diff, diff / float(ref.weight.abs().max())))
            with torch.no_grad():  # what later stages and blocks see: streamprune's pruned weights
                for stage in group:
                    for name in stage:
                        block.get_submodule(name).weight.copy_(written[prefix + name + ".weight"])
    return rows


def check(rows: list[Row], method: str, sequential: bool) -> None:
    table = "\n".join(map(str, rows))
    flips = sum(r.flips for r in rows)
    assert flips <= MAX_FLIPS, f"{flips} mask disagreements, more than {MAX_FLIPS}\n{table}"
    assert all(r.gap <= MAX_GAP for r in rows), f"a mask disagreement that is no near-tie (gap > {MAX_GAP:g})\n{table}"
    assert all(r.abs_diff <= ATOL[method] for r in rows), f"weights differ by more than {ATOL[method]:g}\n{table}"
    if not sequential:
        assert all(r.abs_diff <= BLOCK0_ATOL for r in rows if r.block == 0), \
            f"block 0 differs from the paper's algorithm by more than {BLOCK0_ATOL:g}\n{table}"


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "no-sequential"])
@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2", "opt", "bloom", "qwen3", "phi3-longrope", "gemma2",
                                     "gemma3", "qwen3.5", "gemma4", "gemma4-image", "gemma4-e2b"])
def test_sparsegpt_parity(tmp_path, calib, variant, sequential):
    check(parity_rows(tmp_path, calib, variant, "sparsegpt", "unstructured", sequential), "sparsegpt", sequential)


@pytest.mark.parametrize("variant,sequential", [("llama-gqa", True), ("opt", False), ("bloom", True)])
def test_sparsegpt_nm_parity(tmp_path, calib, variant, sequential):
    check(parity_rows(tmp_path, calib, variant, "sparsegpt", "2:4", sequential), "sparsegpt", sequential)


@pytest.mark.parametrize("variant,pattern,sequential", [("llama-gqa", "unstructured", True),
                                                        ("opt", "unstructured", False), ("qwen2", "2:4", True),
                                                        ("bloom", "2:4", False), ("phi3", "2:4", True),
                                                        ("gemma3-image", "2:4", True)])
def test_wanda_parity(tmp_path, calib, variant, pattern, sequential):
    check(parity_rows(tmp_path, calib, variant, "wanda", pattern, sequential), "wanda", sequential)


# Mixture-of-Experts: transformers keeps a block's experts as two stacked parameters, so each expert's inputs are
# rebuilt from the MoE input (a hook on the MoE module) and transformers' own router: the rows routed to expert e
# feed its gate and up projections; its down projection reads act(gate x) * up x of those rows.
MOE_STAGES = {
    "mixtral": LLAMA_STAGES[:2],
    "qwen2_moe": LLAMA_STAGES[:2] + (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"),
                                     ("mlp.shared_expert.down_proj",)),
    "qwen3_moe": LLAMA_STAGES[:2],
    "glm4_moe": LLAMA_STAGES[:2] + (("mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj"),
                                    ("mlp.shared_experts.down_proj",)),
    "minimax_m2": LLAMA_STAGES[:2],
}
# multi-head latent attention: q_a and kv_a read the block's input, q_b and kv_b their normalized latents
MLA_STAGES = (("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_b_proj",),
              ("self_attn.kv_b_proj",), ("self_attn.o_proj",))
MOE_STAGES["deepseek_v3"] = MLA_STAGES + MOE_STAGES["glm4_moe"][2:]
MOE_STAGES["qwen3_next"] = MOE_STAGES["qwen3_5_moe_text"] = MOE_STAGES["qwen2_moe"]
MOE_STAGES["gpt_oss"] = LLAMA_STAGES[:2]
MOE_STAGES["hy_v3"] = MOE_STAGES["ernie4_5_moe"] = MOE_STAGES["glm4_moe"]
MOE_STAGES["glm4_moe_lite"] = MOE_STAGES["deepseek_v3"]
# Llama 4 calls its MLP `feed_forward`; its MoE blocks have an ungated shared expert
FEED_FORWARD = tuple(tuple(n.replace("mlp.", "feed_forward.") for n in stage) for stage in LLAMA_STAGES)
MOE_STAGES["llama4_text"] = FEED_FORWARD[:2] + (("feed_forward.shared_expert.gate_proj",
                                                 "feed_forward.shared_expert.up_proj"),
                                                ("feed_forward.shared_expert.down_proj",))
MOE_STAGES["glm_moe_dsa"] = MOE_STAGES["deepseek_v32"] = MOE_STAGES["deepseek_v3"]  # the indexer: COPIED
MOE_DENSE_STAGES = {"deepseek_v3": MLA_STAGES + LLAMA_STAGES[2:], "llama4_text": FEED_FORWARD}  # a dense block (else
MOE_DENSE_STAGES["glm4_moe_lite"] = MOE_DENSE_STAGES["glm_moe_dsa"] = MOE_DENSE_STAGES["deepseek_v32"] = \
    MOE_DENSE_STAGES["deepseek_v3"]                            # LLaMA's)


@torch.no_grad()
def moe_input(model, windows: torch.Tensor, moe: torch.nn.Module) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = moe.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    try:
        model(windows, use_cache=False)
    finally:
        hook.remove()
    return torch.cat([a.reshape(-1, a.shape[-1]) for a in seen])


def moe_parity_rows(tmp_path: Path, calib: Path, variant: str, method: str, sequential: bool,
                    min_tokens: int = 1) -> list[Row]:
    src = tiny.build(tmp_path / "in", variant)
    out = tmp_path / "out"
    streamprune.prune(src, out, method=method, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED,
                      sequential=sequential, blocksize=BLOCKSIZE, device="cpu", moe_min_tokens=min_tokens)
    windows = calib_windows(calib, src, tiny.VOCAB, SEQLEN, NSAMPLES, SEED)
    dense = {n: p.detach().clone() for n, p in tiny.hf_model(src).named_parameters()}
    model = tiny.hf_model(out)
    written = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.double()
    rows: list[Row] = []
    for b, block in enumerate(model.model.layers):
        prefix = f"model.layers.{b}."
        mlp = block.feed_forward if hasattr(block, "feed_forward") else block.mlp
        moe = mlp if hasattr(mlp, "experts") else None
        model_type = model.config.model_type
        stages = MOE_STAGES[model_type] if moe else MOE_DENSE_STAGES.get(model_type, LLAMA_STAGES)
        stages = block_stages(model_type, block, stages)
        for name, mod in block.named_modules():
            if name in COPIED:
                assert torch.equal(written[prefix + name + ".weight"], dense[prefix + name + ".weight"]), name
        with torch.no_grad():  # block b dense, experts included
            for name, p in block.named_parameters():
                p.copy_(dense[prefix + name])
        for group in [stages] if not sequential else [[stage] for stage in stages]:
            inputs = linear_inputs(model, windows, {stage[0]: block.get_submodule(stage[0]) for stage in group})
            for stage in group:
                for name in stage:
                    got = written[prefix + name + ".weight"].double()
                    ref = rederive(method, "unstructured", dense[prefix + name + ".weight"], inputs[stage[0]], got == 0)
                    flips, gap = ref.flips()
                    diff = float((got - ref.weight).abs().max())
                    rows.append(Row(b, name, flips, gap, diff, diff / float(ref.weight.abs().max())))
            if sequential:
                with torch.no_grad():
                    for stage in group:
                        for name in stage:
                            block.get_submodule(name).weight.copy_(written[prefix + name + ".weight"])
        if moe is not None:
            rows += expert_rows(model, windows, b, moe, dense, written, method, sequential, min_tokens)
        with torch.no_grad():  # what later blocks see: streamprune's pruned block
            for name, p in block.named_parameters():
                p.copy_(written[prefix + name])
    return rows


def router(moe, m: torch.Tensor):
    """transformers' router of an MoE module on `m`: (logits, weights, chosen); MiniMax-M2's takes its block's
    selection bias, gpt-oss's is `router`; Llama 4's gives each expert's sigmoid weight, zero where not chosen
    (returned as every expert's weight and the chosen ones' mask)."""
    if hasattr(moe, "shared_expert") and hasattr(moe, "router"):
        scores, logits = (t.detach() for t in moe.router(m))
        return logits, scores, scores > 0
    if hasattr(moe, "router"):
        return moe.router(m)
    bias = getattr(moe, "e_score_correction_bias", None)
    return moe.gate(m) if bias is None else moe.gate(m, bias)


def expert_rows(model, windows: torch.Tensor, b: int, moe, dense: dict, written: dict, method: str,
                sequential: bool, min_tokens: int) -> list[Row]:
    """Each routed expert of block `b` re-derived from the MoE input and transformers' own router: its gate and up
    projections from the rows routed to it (every row below `min_tokens`), its down projection from their
    hidden activations through the pruned (sequential) or dense gate and up projections."""
    llama4 = model.config.model_type == "llama4_text"  # the routing weight scales the expert's input: expert(g x)
    prefix = f"model.layers.{b}.{'feed_forward' if llama4 else 'mlp'}.experts."
    m = moe_input(model, windows, moe)  # sequential: after the pruned attention (and shared expert)
    _, weights, chosen = router(moe, m)
    if llama4:  # (tokens, E): expert e's rows are its chosen tokens' inputs times their weights
        chosen = torch.where(chosen, torch.arange(chosen.shape[1])[None], -1)
    gate_up, down = dense[prefix + "gate_up_proj"], dense[prefix + "down_proj"]
    gate_up_w, down_w = written[prefix + "gate_up_proj"].double(), written[prefix + "down_proj"].double()
    oss = hasattr(moe.experts, "gate_up_proj_bias")  # gpt-oss: x @ W + b, gate and up interleaved, the clamped SwiGLU
    if oss:  # as linear weights, gate rows then up rows
        gate_up, gate_up_w = (torch.cat((t[..., 0::2], t[..., 1::2]), dim=-1).transpose(1, 2) for t in (gate_up, gate_up_w))
        down, down_w = down.transpose(1, 2), down_w.transpose(1, 2)
    if llama4:  # x @ W: as linear weights, gate rows then up rows
        gate_up, gate_up_w, down, down_w = (t.transpose(1, 2) for t in (gate_up, gate_up_w, down, down_w))
    ffn = down.shape[2]
    rows = []

    def row(name: str, W: torch.Tensor, x: torch.Tensor, got: torch.Tensor) -> None:
        ref = rederive(method, "unstructured", W, x, got == 0)
        diff = float((got - ref.weight).abs().max())
        rows.append(Row(b, name, *ref.flips(), diff, diff / float(ref.weight.abs().max())))

    for e in range(gate_up.shape[0]):
        n = int((chosen == e).any(dim=-1).sum())
        mine = (chosen == e).any(dim=-1)
        x = (m[mine] * weights[mine, e, None] if llama4 else m[mine]) if n >= min_tokens else m  # else every token
        row(f"expert {e} gate ({n} tokens)", gate_up[e, :ffn], x, gate_up_w[e, :ffn])
        row(f"expert {e} up ({n} tokens)", gate_up[e, ffn:], x, gate_up_w[e, ffn:])
        gu = gate_up_w[e] if sequential else gate_up[e].double()
        if oss:
            bias = moe.experts.gate_up_proj_bias[e].double()
            interleaved = torch.stack((x @ gu[:ffn].T + bias[0::2], x @ gu[ffn:].T + bias[1::2]), dim=-1).flatten(-2)
            hidden = moe.experts._apply_gate(interleaved)
        else:
            hidden = torch.nn.functional.silu(x @ gu[:ffn].T) * (x @ gu[ffn:].T)
        row(f"expert {e} down", down[e], hidden, down_w[e])
    return rows


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "no-sequential"])
@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe", "glm4-moe", "minimax-m2", "deepseek-v3",
                                     "qwen3-next", "qwen3.5-moe-fused", "gpt-oss", "hy-v3", "ernie4.5-moe",
                                     "glm4.7-flash", "llama4", "glm5", "deepseek-v3.2"])
def test_moe_sparsegpt_parity(tmp_path, calib, variant, sequential):
    check(moe_parity_rows(tmp_path, calib, variant, "sparsegpt", sequential), "sparsegpt", sequential)


def test_moe_wanda_parity_with_fallback(tmp_path, calib):
    """Wanda, and experts below --moe-min-tokens fed every token's statistics."""
    rows = moe_parity_rows(tmp_path, calib, "qwen2-moe", "wanda", True, min_tokens=200)
    assert any("tokens)" in r.name and int(r.name.split("(")[1].split()[0]) < 200 for r in rows)
    check(rows, "wanda", True)


@pytest.mark.parametrize("pattern,grid", [("unstructured", (4, 32, True)), ("unstructured", (4, 32, False)),
                                          ("unstructured", (4, -1, True)), ("unstructured", (4, -1, False)),
                                          ("2:4", (4, 32, False))])
def test_sparsegpt_quant_parity(tmp_path, calib, pattern, grid):
    """--wbits 4: the joint sweep against the float64 re-derivation, whose kept weights take the written weight's
    codes on the reference's own grid (so a grid that differs shows as a weight difference)."""
    check(parity_rows(tmp_path, calib, "llama-gqa", "sparsegpt", pattern, True, grid), "sparsegpt", True)
