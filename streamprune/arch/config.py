"""The parsed model configuration: sizes plus the flags that tell families apart."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamprune.errors import CheckpointError, UnsupportedModelError

# Bounds that no real checkpoint reaches; past them config.json is refused before anything is allocated.
MAX_HIDDEN = 1 << 17
MAX_LAYERS = 4096
MAX_VOCAB = 1 << 22
MAX_POSITIONS = 1 << 24
MAX_EXPERTS = 1 << 12

LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "linear_attention")


@dataclass
class ModelConfig:
    """Everything the block forward and the role table need, parsed from config.json.

    Family differences are flags here, not separate code paths: the norm kind, the activation,
    gating, the position scheme, biases and the residual layout.
    """

    family: str
    model_type: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    n_kv_heads: int = 0  # 0: same as n_heads
    head_dim: int = 0  # 0: hidden_size // n_heads
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_affine: bool = True
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    post_norms: bool = False  # Gemma: the attention's and the MLP's outputs are normalized before each residual add
    act: str = "silu"  # "silu" | "relu" | "gelu" | "gelu_tanh"
    # gpt-oss's clamped SwiGLU where set: gate clamped above at the limit, up to [-limit, limit], then
    # gate * sigmoid(alpha * gate) * (up + 1)
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702
    gated: bool = True  # act(gate(x)) * up(x)
    gate_up_fused: bool = False  # gate and up stored as one matrix, gate rows first (Phi-3)
    pos: str = "rope"  # "rope" | "learned" | "alibi"
    pos_offset: int = 0  # OPT's learned positions start at index 2
    rope: dict[str, Any] = field(default_factory=dict)  # rope_type, rope_theta and scaling parameters
    rope_sliding: dict[str, Any] | None = None  # of the sliding blocks, where it differs (Gemma 3's local base)
    # RoPE rotates the first `rotary_dim` features of each head (0: int(head_dim x rope's partial_rotary_factor));
    # interleaved: the pairs rotated together are features (2i, 2i + 1), else (i, i + rotary_dim / 2)
    rotary_dim: int = 0
    rope_interleave: bool = False
    qkv_layout: str = "separate"  # "separate" q/k/v; one fused matrix: "per_head" (BLOOM), "concat" (Phi-3)
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm of queries and keys before RoPE: each head's (head_dim weights)
    qk_norm_per_head: bool = True  # or, False, over the projection's whole width (MiniMax-M2)
    # queries and keys scaled to unit RMS per head, without weights, after RoPE, in the blocks that rotate (Llama 4)
    qk_unit_norm: bool = False
    v_norm: bool = False  # values scaled to unit RMS per head, without weights (Gemma 4)
    # the full-attention blocks' own head width and key-value heads where > 0 (Gemma 4: wider heads, fewer of them),
    # and whether their values are their keys' projection (no v projection: Gemma 4's attention_k_eq_v)
    global_head_dim: int = 0
    global_kv_heads: int = 0
    global_values_from_keys: bool = False
    values_from_keys: bool = False  # this block's (ModelConfig.block)
    out_bias: bool = False
    mlp_bias: bool = False
    norm_before: bool = True  # pre-norm; False is OPT-350m's post-norm block
    residual_from_norm: bool = False  # BLOOM's apply_residual_connection_post_layernorm
    embed_norm: bool = False
    embed_scale: float = 1.0  # the embedding is multiplied by it (Gemma: sqrt(hidden_size), in the stored dtype)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this); None: 1/sqrt(head_dim)
    attn_scale_factor: float = 1.0  # and times this (DeepSeek-V3's YaRN: mscale(factor, mscale_all_dim) squared)
    # multi-head latent attention (DeepSeek-V3) where kv_lora_rank > 0: each head's query and key are `qk_nope_dim`
    # features without position and `qk_rope_dim` rotated ones (head_dim is their sum; the rotated key is shared by
    # the heads), its value `v_head_dim`; queries through a rank-`q_lora_rank` bottleneck where > 0
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    # DeepSeek sparse attention where index_topk > 0 (DeepSeek-V3.2, GLM-5): each query attends to the `index_topk`
    # earlier keys its lightning indexer scores highest (`index_heads` heads `index_head_dim` wide, their first
    # qk_rope_dim features rotated, in interleaved pairs where `index_rope_interleave`)
    index_topk: int = 0
    index_heads: int = 0
    index_head_dim: int = 0
    index_rope_interleave: bool = False
    latent_norm_eps: float = 1e-6  # of the latents' RMSNorms (transformers builds them with its default, not the config's)
    # each head's query comes with as many features of an output gate (the q projection twice as wide: per head, the
    # query then the gate); the attention's output is multiplied by their sigmoid before the output projection
    attn_output_gate: bool = False
    # Gated DeltaNet linear attention, in the blocks whose layer type is "linear_attention" (see delta.py): heads of
    # keys (and queries) and of values, their widths, the causal convolution's taps, and the input projections fused
    # by key head (Qwen3-Next's in_proj_qkvz, in_proj_ba) or split (Qwen3.5's in_proj_qkv, _z, _b, _a)
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_k_dim: int = 0
    linear_v_dim: int = 0
    linear_conv: int = 0
    linear_fused_in: bool = False
    attn_sinks: bool = False  # a learned logit per head joins each query's softmax, its value zero (gpt-oss)
    attn_softcap: float | None = None  # attention logits become cap * tanh(logits / cap) (Gemma 2)
    final_softcap: float | None = None  # and so do the output logits
    final_norm: bool = True
    embed_dim: int = 0  # OPT word_embed_proj_dim; 0: hidden_size
    tie_word_embeddings: bool = False
    max_positions: int | None = None
    sliding_window: int | None = None
    # per block: "full_attention", "sliding_attention" (each query sees its last `sliding_window` tokens),
    # "chunked_attention" (each query sees the tokens before it in its own chunk of `attention_chunk` tokens) or
    # "linear_attention"; () is every block sliding where sliding_window is set
    layer_types: tuple[str, ...] | list[str] = ()
    attention_chunk: int | None = None
    # blocks that attend without positions (NoPE: no RoPE, though the model's others rotate; Llama 4), and the
    # temperature their queries are scaled by where set (floor_scale, attn_scale): at position p,
    # log1p(floor((p + 1) / floor_scale)) x attn_scale + 1
    nope_layers: frozenset[int] = frozenset()
    nope_temperature: tuple[float, float] | None = None
    # Mixture-of-Experts (0 experts: a dense model): each MoE block routes every token to `experts_per_tok` of
    # `n_experts` experts (MLPs of width `expert_ffn_dim`), plus a gated shared expert of `shared_ffn_dim` if > 0
    n_experts: int = 0
    experts_per_tok: int = 0
    expert_ffn_dim: int = 0
    shared_ffn_dim: int = 0
    norm_topk_prob: bool = False  # the kept routing weights are renormalized to sum to 1
    shared_gate: bool = True  # the shared expert's output is scaled by a sigmoid gate (Qwen2-MoE); else added as is
    # the router's scores: "softmax" over the experts, each expert's "sigmoid", "topk_softmax": the top-k logits
    # chosen, then their softmax (gpt-oss), or "topk_sigmoid": the top-k logits chosen, then each one's sigmoid
    # (Llama 4); with `router_bias`, a per-expert
    # bias (DeepSeek-V3's e_score_correction_bias) is added to the scores for choosing the experts, not to their
    # weights; group-limited choice: the experts fall into `n_group` groups, only the experts of the `topk_group`
    # groups of highest score (the sum of a group's two best biased scores) can be chosen; the chosen weights are
    # multiplied by `routed_scaling`
    router: str = "softmax"
    router_bias: bool = False
    router_logit_bias: bool = False  # the router's linear adds a bias to its logits (gpt-oss)
    router_bias_2d: bool = False  # the selection bias is stored (1, n_experts) (ERNIE 4.5)
    expert_bias: bool = False  # each routed expert's projections have biases (gpt-oss)
    # the routing weight multiplies what enters the expert, not what leaves it: expert(weight * x) (Llama 4)
    weight_expert_input: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    dense_layers: frozenset[int] = frozenset()  # blocks of an MoE model that have a dense MLP instead
    layer_scalar: bool = False  # the block's output multiplied by a stored scalar (Gemma 4)
    # per-layer inputs where per_layer_dim > 0 (Gemma 4's E2B/E4B): each block adds a projection of its own
    # `per_layer_dim` inputs, from a table of `per_layer_vocab` rows and from the embedding (see perlayer.py)
    per_layer_dim: int = 0
    per_layer_vocab: int = 0
    # the last `kv_shared_layers` blocks reuse the keys and values of the last earlier block of their layer type (no
    # k/v projections of their own; Gemma 4's edge models), their MLP twice as wide where `double_wide_mlp`
    kv_shared_layers: int = 0
    double_wide_mlp: bool = False
    kv_reused: bool = False  # this block's (ModelConfig.block)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, bound in (
            ("hidden_size", MAX_HIDDEN),
            ("n_layers", MAX_LAYERS),
            ("n_heads", MAX_HIDDEN),
            ("ffn_dim", 64 * MAX_HIDDEN),
            ("vocab_size", MAX_VOCAB),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= bound:
                raise CheckpointError(f"config.json: {name}={value!r} is not an integer in 1..{bound}")
        for name, value in (("max_position_embeddings", self.max_positions), ("sliding_window", self.sliding_window),
                            ("attention_chunk_size", self.attention_chunk)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or not 0 < value <= MAX_POSITIONS):
                raise CheckpointError(f"config.json: {name}={value!r} is not an integer in 1..{MAX_POSITIONS}")
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if self.head_dim == 0:
            if self.hidden_size % self.n_heads:
                raise CheckpointError(
                    f"config.json: hidden_size={self.hidden_size} is not divisible by n_heads={self.n_heads}"
                )
            self.head_dim = self.hidden_size // self.n_heads
        if not 0 < self.n_kv_heads <= self.n_heads or self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"config.json: num_key_value_heads={self.n_kv_heads!r} must divide num_attention_heads={self.n_heads}"
            )
        if not self.layer_types:
            self.layer_types = ("sliding_attention" if self.sliding_window else "full_attention",) * self.n_layers
        if (not isinstance(self.layer_types, (list, tuple)) or len(self.layer_types) != self.n_layers
                or not all(isinstance(t, str) for t in self.layer_types)):
            raise CheckpointError(f"config.json: layer_types={self.layer_types!r:.120} is not a list of "
                                  f"{self.n_layers} layer types (num_hidden_layers)")
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise UnsupportedModelError(f"config.json: layer type {unknown[0]!r} is not supported; expected one of "
                                        f"{LAYER_TYPES}")
        self.layer_types = tuple(self.layer_types)
        if "chunked_attention" in self.layer_types and self.attention_chunk is None:
            raise CheckpointError("config.json: chunked attention layers without attention_chunk_size")
        if not self.nope_layers <= set(range(self.n_layers)):
            raise CheckpointError(f"config.json: NoPE layers {sorted(self.nope_layers)} outside 0..{self.n_layers - 1}")
        if self.kv_shared_layers and (not 0 < self.kv_shared_layers < self.n_layers or any(
                kind not in self.layer_types[:self.n_layers - self.kv_shared_layers]
                for kind in self.layer_types[self.n_layers - self.kv_shared_layers:])):
            raise CheckpointError(f"config.json: num_kv_shared_layers={self.kv_shared_layers}: the last blocks reuse "
                                  "the keys and values of an earlier block of their layer type, which must exist")
        if self.nope_temperature is not None and not (self.nope_temperature[0] > 0 and self.nope_temperature[1] >= 0):
            raise CheckpointError(f"config.json: floor_scale / attn_scale {self.nope_temperature} must be positive")
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise CheckpointError(f"config.json: {name}={value!r} is not positive")
        if self.embed_dim == 0:
            self.embed_dim = self.hidden_size
        if self.pos == "rope" and self.rotary_dim == 0:
            self.rotary_dim = rotary_dim(self.rope, self.head_dim)
        if self.pos == "rope" and (not 0 < self.rotary_dim <= self.head_dim or self.rotary_dim % 2):
            raise CheckpointError(f"config.json: {self.rotary_dim} rotated features per head (partial_rotary_factor "
                                  f"x head_dim {self.head_dim}) is not an even number in 2..head_dim")
        self.check_experts()
        self.check_linear_attention()
        assert self.qkv_layout in ("separate", "per_head", "concat"), self.qkv_layout  # set by a family's parser
        if self.qkv_layout == "per_head" and self.n_kv_heads != self.n_heads:
            raise CheckpointError(f"config.json: num_key_value_heads={self.n_kv_heads!r} must equal "
                                  f"num_attention_heads={self.n_heads} for a per-head fused query_key_value")
        if self.rope.get("rope_type") == "longrope":
            for key in ("short_factor", "long_factor"):
                factors = self.rope.get(key)
                if (not isinstance(factors, list) or len(factors) != self.rotary_dim // 2
                        or not all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in factors)):
                    raise CheckpointError(f"config.json: rope {key}={factors!r:.80} is not a list of "
                                          f"{self.rotary_dim // 2} numbers (rotated features / 2)")
        if self.act not in ("silu", "relu", "gelu", "gelu_tanh"):
            raise UnsupportedModelError(f"activation {self.act!r} is not supported; expected silu, relu or gelu")

    def check_experts(self) -> None:
        """The routed experts' sizes and the router's scores and groups (of an MoE model)."""
        if not self.n_experts:
            return
        if not 0 < self.experts_per_tok <= self.n_experts or self.n_experts > MAX_EXPERTS:
            raise CheckpointError(f"config.json: num_experts_per_tok={self.experts_per_tok!r} must be in 1..n_experts "
                                  f"({self.n_experts}, at most {MAX_EXPERTS})")
        if not 0 < self.expert_ffn_dim <= 64 * MAX_HIDDEN or not 0 <= self.shared_ffn_dim <= 64 * MAX_HIDDEN:
            raise CheckpointError(f"config.json: expert width {self.expert_ffn_dim!r} / shared expert width "
                                  f"{self.shared_ffn_dim!r} out of range")
        if self.router not in ("softmax", "sigmoid", "topk_softmax", "topk_sigmoid"):
            raise UnsupportedModelError(f"config.json: router scoring {self.router!r} is not supported; expected "
                                        "softmax, sigmoid, topk_softmax or topk_sigmoid")
        if (self.n_group < 1 or self.n_experts % self.n_group or not 1 <= self.topk_group <= self.n_group
                or self.experts_per_tok > self.topk_group * (self.n_experts // self.n_group)):
            raise CheckpointError(f"config.json: n_group={self.n_group!r} / topk_group={self.topk_group!r} do not "
                                  f"split {self.n_experts} experts into groups holding the {self.experts_per_tok} "
                                  "each token is routed to")

    def check_linear_attention(self) -> None:
        """The linear-attention blocks' sizes, where the model has any."""
        if "linear_attention" not in self.layer_types:
            return
        sizes = (self.linear_k_heads, self.linear_v_heads, self.linear_k_dim, self.linear_v_dim, self.linear_conv)
        if not all(0 < n <= MAX_HIDDEN for n in sizes) or self.linear_v_heads % self.linear_k_heads:
            raise CheckpointError(
                f"config.json: linear attention with {self.linear_k_heads!r} key heads of {self.linear_k_dim!r}, "
                f"{self.linear_v_heads!r} value heads of {self.linear_v_dim!r} and {self.linear_conv!r} convolution "
                "taps: expected positive sizes, the value heads a multiple of the key heads")

    def block(self, bid: int) -> ModelConfig:
        """The config as block `bid` sees it: a full-attention block's own head width and key-value heads (Gemma 4's
        global blocks), a block reusing another's keys and values without k/v projections and with its MLP's width;
        else this one."""
        changes: dict[str, Any] = {}
        if self.layer_types[bid] == "full_attention" and (self.global_head_dim or self.global_kv_heads
                                                          or self.global_values_from_keys):
            head_dim = self.global_head_dim or self.head_dim
            changes.update(head_dim=head_dim, n_kv_heads=self.global_kv_heads or self.n_kv_heads,
                           rotary_dim=rotary_dim(self.rope, head_dim), values_from_keys=self.global_values_from_keys)
        if self.kv_mode(bid) == "reuse":
            changes.update(kv_reused=True, ffn_dim=self.ffn_dim * (2 if self.double_wide_mlp else 1))
        if not changes:
            return self
        return dataclasses.replace(self, **changes, global_head_dim=0, global_kv_heads=0, global_values_from_keys=False,
                                   kv_shared_layers=0)

    def kv_mode(self, bid: int) -> str | None:
        """Whether block `bid` "reuse"s an earlier block's keys and values, "store"s its own for later blocks (the last
        block of its layer type before the reusing ones), or neither (None)."""
        first = self.n_layers - self.kv_shared_layers
        if not self.kv_shared_layers:
            return None
        if bid >= first:
            return "reuse"
        reused = self.layer_types[bid] in self.layer_types[first:]
        return "store" if reused and self.kv_source(bid) == bid else None

    def kv_source(self, bid: int) -> int:
        """The block whose keys and values block `bid`'s layer type reuses: the last of that type before the reusing
        blocks."""
        first = self.n_layers - self.kv_shared_layers
        kind = self.layer_types[bid]
        return max(b for b in range(first) if self.layer_types[b] == kind)

    def is_linear(self, bid: int) -> bool:
        """Whether block `bid` mixes its tokens by linear attention (Gated DeltaNet) instead of attention."""
        return self.layer_types[bid] == "linear_attention"

    def kind(self, bid: int) -> tuple[bool, bool, tuple[int, int, bool, int]]:
        """What block `bid` holds, as far as its tensors' shapes go: (routed experts, linear attention, its heads'
        width and key-value heads, whether it reuses another's keys and values, its MLP's width)."""
        b = self.block(bid)
        return self.is_moe(bid), self.is_linear(bid), (b.head_dim, b.n_kv_heads, b.kv_reused, b.ffn_dim)

    def window(self, layer_type: str) -> int | None:
        """How many tokens back (the query's own included) a layer of `layer_type` attends to; None: all."""
        return self.sliding_window if layer_type == "sliding_attention" else None

    def chunk(self, layer_type: str) -> int | None:
        """The length of the chunks a layer of `layer_type` attends within; None: none."""
        return self.attention_chunk if layer_type == "chunked_attention" else None

    def position_kind(self, bid: int) -> str:
        """What block `bid` attends with, as far as positions go: its layer type, NoPE blocks apart."""
        return self.layer_types[bid] + (":nope" if bid in self.nope_layers else "")

    def is_moe(self, bid: int) -> bool:
        """Whether block `bid` holds routed experts (else a dense MLP)."""
        return self.n_experts > 0 and bid not in self.dense_layers

    @property
    def attn_scale(self) -> float:
        return self.scale_for(self.head_dim)

    def scale_for(self, head_dim: int) -> float:
        """The attention's softmax scale for heads `head_dim` wide."""
        scalar = head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
        return 1.0 / math.sqrt(scalar) if self.attn_scale_factor == 1.0 else scalar ** -0.5 * self.attn_scale_factor

    @property
    def default_seqlen(self) -> int:
        """Evaluation window length when none is given: the model's maximum, capped at 2048."""
        return min(self.max_positions or 2048, 2048)

    def check_seqlen(self, seqlen: int) -> None:
        """Refuse a window length the model cannot attend over as trained. A sliding window shorter than `seqlen` is
        no reason: sliding layers mask what lies farther back, exactly."""
        from streamprune.errors import ArgumentError

        if seqlen < 2:
            raise ArgumentError(f"seqlen {seqlen!r} is too small; expected at least 2")
        if self.max_positions is not None and seqlen > self.max_positions:
            raise ArgumentError(
                f"seqlen {seqlen} exceeds the model's maximum positions ({self.max_positions})"
            )


def rotary_dim(rope: dict[str, Any], head_dim: int) -> int:
    """How many of a head's features RoPE `rope` rotates: int(head_dim x partial_rotary_factor), or all of them for
    proportional RoPE (Gemma 4: every feature pair of the head, the unrotated ones at frequency zero)."""
    if rope.get("rope_type") == "proportional":
        return head_dim
    return int(head_dim * rope.get("partial_rotary_factor", 1.0))


def get_layer_types(raw: dict[str, Any], n_layers: int, sliding: Callable[[int], bool]) -> list[str]:
    """config.json's `layer_types` (checked by ModelConfig), or where it has none: block i slides where
    `sliding(i)`."""
    given = raw.get("layer_types")
    if given is not None:
        return given
    return ["sliding_attention" if sliding(i) else "full_attention" for i in range(n_layers)]


def get_int(raw: dict[str, Any], *keys: str, default: int | None = None) -> int:
    """First present key among `keys` in config.json, or `default`; absent and no default is an error."""
    for key in keys:
        if key in raw and raw[key] is not None:
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool):
                raise CheckpointError(f"config.json: {key}={value!r} is not an integer")
            return value
    if default is None:
        raise CheckpointError(f"config.json has none of {', '.join(map(repr, keys))}")
    return default


def get_float(raw: dict[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"config.json: {key}={value!r} is not a finite number")
    return float(value)


def get_bool(raw: dict[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: {key}={value!r} is not true or false")
    return value
