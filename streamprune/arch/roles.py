"""Tensor roles shared by every architecture, and the pruning order written once in roles."""

from __future__ import annotations

from enum import Enum


class Role(Enum):
    """What a tensor does in the network, independent of what a checkpoint calls it."""

    TOKEN_EMBD = "token_embd"
    POS_EMBD = "pos_embd"  # learned position table (OPT)
    EMBD_NORM = "embd_norm"  # norm right after the embedding (BLOOM)
    PROJ_IN = "proj_in"  # embedding dim -> hidden (OPT-350m)
    PROJ_OUT = "proj_out"  # hidden -> embedding dim (OPT-350m)
    OUTPUT_NORM = "output_norm"
    OUTPUT = "output"  # lm_head
    ATTN_NORM = "attn_norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_Q_NORM = "attn_q_norm"  # per-head RMSNorm of the queries, before RoPE (Qwen3)
    ATTN_K_NORM = "attn_k_norm"  # and of the keys
    ATTN_QKV = "attn_qkv"  # fused q, k, v projection (BLOOM, Phi-3; ModelConfig.qkv_layout says how)
    # Multi-head latent attention (DeepSeek-V3): queries through a low-rank bottleneck (q_a, its norm, q_b), keys and
    # values from one compressed latent (kv_a: the latent and the shared rotary key; its norm; kv_b: per-head keys
    # and values)
    ATTN_Q_A = "attn_q_a"
    ATTN_Q_A_NORM = "attn_q_a_norm"
    ATTN_Q_B = "attn_q_b"
    ATTN_KV_A_MQA = "attn_kv_a_mqa"
    ATTN_KV_A_NORM = "attn_kv_a_norm"
    ATTN_KV_B = "attn_kv_b"
    # DeepSeek sparse attention's lightning indexer (DeepSeek-V3.2, GLM-5): its queries from the query latent, one key
    # from the block's input (with its LayerNorm), each head's weight from the block's input; copied, never pruned
    ATTN_IDX_Q_B = "attn_idx_q_b"
    ATTN_IDX_K = "attn_idx_k"
    ATTN_IDX_K_NORM = "attn_idx_k_norm"
    ATTN_IDX_WEIGHTS = "attn_idx_weights"
    ATTN_OUT = "attn_out"
    ATTN_SINKS = "attn_sinks"  # a learned softmax logit per head, of the attention module (gpt-oss's `sinks`)
    ATTN_POST_NORM = "attn_post_norm"  # norm of the attention's output before the residual add (Gemma)
    FFN_NORM = "ffn_norm"
    FFN_POST_NORM = "ffn_post_norm"  # norm of the MLP's output before the residual add (Gemma)
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    FFN_GATE_UP = "ffn_gate_up"  # fused gate and up projection: gate rows, then up rows (Phi-3)
    # Mixture-of-Experts: the router, each routed expert's MLP (names carry `{xid}`), a shared expert and its gate
    FFN_GATE_INP = "ffn_gate_inp"  # router: (n_experts, hidden); never pruned
    FFN_EXP_PROBS_B = "ffn_exp_probs_b"  # the router's selection bias (n_experts,): e_score_correction_bias
    FFN_GATE_EXP = "ffn_gate_exp"
    FFN_UP_EXP = "ffn_up_exp"
    FFN_DOWN_EXP = "ffn_down_exp"
    FFN_GATE_SHEXP = "ffn_gate_shexp"
    FFN_UP_SHEXP = "ffn_up_shexp"
    FFN_DOWN_SHEXP = "ffn_down_shexp"
    FFN_GATE_INP_SHEXP = "ffn_gate_inp_shexp"  # the shared expert's scalar gate (1, hidden); never pruned
    ROPE_FREQS = "rope_freqs"  # stored rotary buffer of old checkpoints; copied, never used
    # Gemma 4's per-layer inputs: a table of every token's inputs to every block and a projection of the embedding
    # into them (its norm), model-wide; in each block, a gate from the block's output multiplied by the block's input,
    # projected back (its norm) and added to the residual stream
    PLE_EMBD = "ple_embd"
    PLE_MODEL_PROJ = "ple_model_proj"
    PLE_PROJ_NORM = "ple_proj_norm"
    PLE_GATE = "ple_gate"
    PLE_PROJ = "ple_proj"
    PLE_POST_NORM = "ple_post_norm"
    LAYER_SCALAR = "layer_scalar"  # the block's output multiplied by it (Gemma 4's `layer_scalar`, (1,))
    # Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5; see delta.py): the input projections, fused (q, k, v, z
    # grouped by key head; b, a likewise) or split; the causal convolution; the decay's A_log and dt_bias (one
    # parameter each, of the module); the gated output norm and the output projection
    SSM_IN_QKVZ = "ssm_in_qkvz"
    SSM_IN_BA = "ssm_in_ba"
    SSM_IN_QKV = "ssm_in_qkv"
    SSM_IN_Z = "ssm_in_z"
    SSM_IN_B = "ssm_in_b"
    SSM_IN_A = "ssm_in_a"
    SSM_CONV1D = "ssm_conv1d"
    SSM_A = "ssm_a"
    SSM_NORM = "ssm_norm"
    SSM_OUT = "ssm_out"


class Site(Enum):
    """A point inside a block where one activation feeds one or more linear layers."""

    ATTN_IN = "attn_in"
    ATTN_Q_B_IN = "attn_q_b_in"  # MLA: the normalized query latent
    ATTN_KV_B_IN = "attn_kv_b_in"  # MLA: the normalized key-value latent
    ATTN_OUT_IN = "attn_out_in"
    FFN_IN = "ffn_in"
    FFN_DOWN_IN = "ffn_down_in"
    SHEXP_DOWN_IN = "shexp_down_in"  # the shared expert's hidden activations
    PLE_IN = "ple_in"  # Gemma 4: the block's output before its per-layer input is added
    PLE_PROJ_IN = "ple_proj_in"  # the gated per-layer input
    # A routed expert's sites: its input is the tokens routed to it (or, with --moe-calibration all, every token)
    EXP_IN = "exp_in"
    EXP_DOWN_IN = "exp_down_in"


# The pruning order, as data: each entry is one input site and the linears that read it.
# Linears of one site share one Hessian; later sites see the outputs of already pruned ones. A block's token mixer is
# attention or linear attention: the same two sites (its input, the input of its output projection) with the roles
# of its kind. Linear attention's decay and rate projections (b, a) are copied as read, as routers are: a few rows
# per block that gate each head's state, whose pruning showed neither cost nor gain (docs/architectures.md).
SEQUENTIAL: tuple[tuple[Site, tuple[Role, ...]], ...] = (
    (Site.ATTN_IN, (Role.ATTN_Q, Role.ATTN_K, Role.ATTN_V, Role.ATTN_QKV, Role.ATTN_Q_A, Role.ATTN_KV_A_MQA,
                    Role.SSM_IN_QKVZ, Role.SSM_IN_QKV, Role.SSM_IN_Z)),
    (Site.ATTN_Q_B_IN, (Role.ATTN_Q_B,)),
    (Site.ATTN_KV_B_IN, (Role.ATTN_KV_B,)),
    (Site.ATTN_OUT_IN, (Role.ATTN_OUT, Role.SSM_OUT)),
    (Site.FFN_IN, (Role.FFN_GATE, Role.FFN_UP, Role.FFN_GATE_UP, Role.FFN_GATE_SHEXP, Role.FFN_UP_SHEXP)),
    (Site.FFN_DOWN_IN, (Role.FFN_DOWN,)),
    (Site.SHEXP_DOWN_IN, (Role.FFN_DOWN_SHEXP,)),
    (Site.PLE_IN, (Role.PLE_GATE,)),
    (Site.PLE_PROJ_IN, (Role.PLE_PROJ,)),
)

# A routed expert's order, applied to one expert at a time after the block's other sites: its gate and up
# projections read the MoE input of the tokens routed to it, its down projection its own hidden activations.
EXPERT_SEQUENTIAL: tuple[tuple[Site, tuple[Role, ...]], ...] = (
    (Site.EXP_IN, (Role.FFN_GATE_EXP, Role.FFN_UP_EXP)),
    (Site.EXP_DOWN_IN, (Role.FFN_DOWN_EXP,)),
)

EXPERT_ROLES: frozenset[Role] = frozenset(role for _, roles in EXPERT_SEQUENTIAL for role in roles)

PRUNABLE: frozenset[Role] = frozenset(role for _, roles in SEQUENTIAL + EXPERT_SEQUENTIAL for role in roles)

# Roles that live inside a decoder block (their names carry `{bid}`).
BLOCK_ROLES: frozenset[Role] = PRUNABLE | {Role.ATTN_NORM, Role.FFN_NORM, Role.ROPE_FREQS, Role.ATTN_Q_NORM,
                                           Role.ATTN_K_NORM, Role.ATTN_POST_NORM, Role.FFN_POST_NORM, Role.FFN_GATE_INP,
                                           Role.FFN_GATE_INP_SHEXP, Role.FFN_EXP_PROBS_B, Role.ATTN_Q_A_NORM,
                                           Role.ATTN_KV_A_NORM, Role.SSM_IN_BA, Role.SSM_IN_B, Role.SSM_IN_A,
                                           Role.SSM_CONV1D, Role.SSM_A, Role.SSM_NORM, Role.ATTN_SINKS,
                                           Role.LAYER_SCALAR, Role.PLE_POST_NORM, Role.ATTN_IDX_Q_B, Role.ATTN_IDX_K,
                                           Role.ATTN_IDX_K_NORM, Role.ATTN_IDX_WEIGHTS}

# The router's tensors: one entry per routed expert (cut to the kept ones when experts are removed), along their
# first axis (the router's rows and biases) or, for the selection bias, its last (ERNIE 4.5 stores it (1, n_experts)).
ROUTER_ROLES: frozenset[Role] = frozenset({Role.FFN_GATE_INP, Role.FFN_EXP_PROBS_B})


def expert_axis(role: Role) -> int:
    """The axis of a router tensor (of role `role`) along which it holds one entry per routed expert."""
    return -1 if role is Role.FFN_EXP_PROBS_B else 0
