"""Tiny random Hugging Face models for parity tests, built with transformers and saved as safetensors."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

VOCAB = 256

GEMMA_ATTN_CAP, GEMMA_FINAL_CAP = 1.0, 2.0
# Gemma 3: a linear-scaled global RoPE beside the sliding blocks' own base, the last of 3 blocks global
GEMMA3_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=16,
                   query_pre_attn_scalar=24, sliding_window_pattern=3, initializer_range=0.1,
                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})

# the hybrid Qwen families: 3 Gated DeltaNet blocks and 1 of gated attention (a quarter of each head rotated), 2 key
# heads shared by 4 value heads in the linear attention; the MoE ones 4 experts of which 2 per token, a gated shared
# expert
QWEN_HYBRID = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, linear_num_key_heads=2,
                   linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                   moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
                   num_experts_per_tok=2, initializer_range=0.1)
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                   num_position_embeddings=16)

# name -> (config class name, config kwargs)
LLAMA4_TEXT = dict(hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                   num_experts_per_tok=1, interleave_moe_layer_step=2, attention_chunk_size=8,
                   no_rope_layers=[1, 1, 1, 0], floor_scale=4, attn_scale=0.5, max_position_embeddings=128,
                   initializer_range=0.1,
                   rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=32))

# Gemma 4 as the 31B is made: sliding blocks of 16-wide heads over 2 key-value heads, global blocks 1 and 3 of 32-wide
# heads over one, their values the keys' projection, proportional RoPE; an 8-token window (the test windows are longer)
GEMMA4_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                   attention_k_eq_v=True, hidden_size_per_layer_input=0, sliding_window=8, max_position_embeddings=128,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                   final_logit_softcapping=30.0, initializer_range=0.1)
SPARSE_ATTENTION = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16,
                        qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8,
                        num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.8, index_topk=8,
                        index_n_heads=2, index_head_dim=16, max_position_embeddings=128, initializer_range=0.1)

VARIANTS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=4, max_position_embeddings=128)),
    "llama-gqa": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                                      num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0)),
    "llama3-rope": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        rope_theta=500000.0,
                                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-bias-tied": ("LlamaConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=128, attention_bias=True,
                                            mlp_bias=True, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      sliding_window=64)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, max_position_embeddings=128)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                                pad_token_id=None)),
    # LongRoPE with the long factors in use past 32 tokens (the tests' windows are 40-64 long), a sliding window
    # shorter than those windows
    "phi3-longrope": ("Phi3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                         original_max_position_embeddings=32, sliding_window=40, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=None,
                                         rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(8)],
                                                           long_factor=[1.0 + 0.7 * i for i in range(8)]))),
    # Phi-4-mini's partial rotary: 12 of each head's 16 features rotated, LongRoPE over them
    "phi4-mini": ("Phi3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=128, partial_rotary_factor=0.75,
                                     original_max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=None, tie_word_embeddings=True, initializer_range=0.1,
                                     rope_scaling=dict(type="longrope", short_factor=[1.0 + 0.1 * i for i in range(6)],
                                                       long_factor=[1.0 + 0.7 * i for i in range(6)]))),
    # blocks from max_window_layers on slide, here over 16 tokens
    "qwen3-window": ("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=128, use_sliding_window=True, sliding_window=16,
                                         max_window_layers=1)),
    # Gemma: weights 5x larger than transformers' init so that the soft-caps bite (logits and scores reach several
    # times the caps); sliding blocks (window 16) alternate with global ones
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=16,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=GEMMA_ATTN_CAP,
                                    final_logit_softcapping=GEMMA_FINAL_CAP, initializer_range=0.1)),
    "gemma3": ("Gemma3TextConfig", GEMMA3_TEXT),
    "gemma3-image": ("Gemma3Config", dict(text_config={**GEMMA3_TEXT, "num_hidden_layers": 2},
                                          vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                             num_attention_heads=2, image_size=28, patch_size=14),
                                          mm_tokens_per_image=4, boi_token_index=253, eoi_token_index=254,
                                          image_token_index=255)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=128, word_embed_proj_dim=64)),
    "opt-proj": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=128, word_embed_proj_dim=32)),
    "opt-postln": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=128, word_embed_proj_dim=32,
                                     do_layer_norm_before=False)),
    "bloom": ("BloomConfig", dict(hidden_size=64, n_layer=3, n_head=4)),
    "mixtral": ("MixtralConfig", dict(hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4,
                                      num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, mlp_only_layers=[1])),
    "qwen3-moe": ("Qwen3MoeConfig", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=24, max_position_embeddings=128,
                                         num_experts=5, num_experts_per_tok=2, moe_intermediate_size=32,
                                         norm_topk_prob=True)),
    # GLM-4.5: half of each head rotated, per-head q/k norms, q/k/v biases, a sigmoid router choosing with its bias
    # within the better of 2 groups of 4 experts, weights renormalized and scaled, 2 shared experts, block 0 dense
    "glm4-moe": ("Glm4MoeConfig", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                       max_position_embeddings=128, n_routed_experts=8, num_experts_per_tok=2,
                                       n_shared_experts=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                                       use_qk_norm=True, attention_bias=True, routed_scaling_factor=2.5,
                                       initializer_range=0.1)),
    "glm4-moe-plain": ("Glm4MoeConfig", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, max_position_embeddings=128, n_routed_experts=4,
                                             num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                                             first_k_dense_replace=0, use_qk_norm=False, norm_topk_prob=False,
                                             initializer_range=0.1)),
    # MiniMax-M2: q/k norms over all heads' features, 8 of 16 features rotated (`rotary_dim`), a sigmoid router
    "minimax-m2": ("MiniMaxM2Config", dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           max_position_embeddings=128, num_local_experts=6, num_experts_per_tok=2,
                                           rotary_dim=8, bos_token_id=1, eos_token_id=2, initializer_range=0.1)),
    # DeepSeek-V3: multi-head latent attention with a query bottleneck, YaRN (its mscale on the softmax too),
    # interleaved RoPE; a sigmoid router choosing within the best 2 of 4 groups, renormalized and scaled; a shared
    # expert; block 0 dense
    "deepseek-v3": ("DeepseekV3Config", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                             q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12,
                                             qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=16,
                                             num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
                                             first_k_dense_replace=1, routed_scaling_factor=2.5,
                                             max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
                                             rope_scaling=dict(type="yarn", factor=4.0,
                                                               original_max_position_embeddings=32, beta_fast=32,
                                                               beta_slow=1, mscale=0.8, mscale_all_dim=0.6))),
    # without the query bottleneck (q_proj), RoPE not interleaved, no YaRN, one group
    "deepseek-v3-plain": ("DeepseekV3Config", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                                   q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8,
                                                   qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                                                   num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1,
                                                   first_k_dense_replace=0, rope_interleave=False,
                                                   max_position_embeddings=128, initializer_range=0.1)),
    # YaRN on a LLaMA-block family
    "qwen3-yarn": ("Qwen3Config", dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                       initializer_range=0.1,
                                       rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                         original_max_position_embeddings=32))),
    "bloom-6heads": ("BloomConfig", dict(hidden_size=96, n_layer=2, n_head=6,
                                         apply_residual_connection_post_layernorm=True)),
    # Qwen3-Next: q/k/v/z and b/a projected fused by key head, block 1 a dense MLP, the chosen weights not renormalized
    "qwen3-next": ("Qwen3NextConfig", dict(QWEN_HYBRID, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3.5": ("Qwen3_5TextConfig", QWEN_HYBRID),  # dense
    "qwen3.5-moe": ("Qwen3_5MoeTextConfig", QWEN_HYBRID),  # one tensor per expert
    "qwen3.5-moe-fused": ("Qwen3_5MoeTextConfig", QWEN_HYBRID),  # experts in 3-D tensors (see FUSED)
    # the image-text model as published: the language model under model.language_model, experts fused, a vision tower
    "qwen3.5-moe-image": ("Qwen3_5MoeConfig", dict(text_config=QWEN_HYBRID, vision_config=QWEN_VISION)),
    # gpt-oss: sinks, q/k/v/o and expert biases, a 16-token sliding window in blocks 0 and 2 (the test windows are
    # longer), YaRN, a router with a bias and top-2 of 4 experts, the clamped SwiGLU (a limit the activations reach)
    "gpt-oss": ("GptOssConfig", dict(hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                                     num_local_experts=4, num_experts_per_tok=2, sliding_window=16, swiglu_limit=0.4,
                                     initializer_range=0.1,
                                     rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=8.0,
                                                          beta_fast=32.0, beta_slow=1.0, truncate=False,
                                                          original_max_position_embeddings=32))),
    # Hunyuan 3: per-head q/k norms, a sigmoid router choosing with its expert_bias, renormalized and scaled, a shared
    # expert; block 0 dense
    "hy-v3": ("HYV3Config", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                                 num_experts=6, num_experts_per_tok=2, initializer_range=0.1)),
    # ERNIE 4.5 MoE: interleaved RoPE, a float32 softmax router choosing with its (1, n) selection bias, a shared
    # expert; block 0 dense (moe_layer_start_index 1)
    "ernie4.5-moe": ("Ernie4_5_MoeConfig", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                                num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, max_position_embeddings=128, moe_num_experts=6, moe_k=2,
                                                moe_num_shared_experts=1, moe_layer_start_index=1,
                                                initializer_range=0.1)),
    # GLM-4.7-Flash: DeepSeek-V3's multi-head latent attention and GLM-4.5's MoE; its dense blocks by mlp_layer_types
    "glm4.7-flash": ("Glm4MoeLiteConfig", dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                                               q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=12,
                                               qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8,
                                               num_experts_per_tok=2, n_group=2, topk_group=1,
                                               mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=1.8,
                                               max_position_embeddings=128, initializer_range=0.1)),
    # Kimi-K2.5: Kimi-K2's language model (DeepSeek-V3's) in an image-text model, saved with its released names
    # (`language_model.model.`, `language_model.lm_head`, the vision tower and projector beside)
    "kimi-k2.5": ("Kimi_K25Config", dict(
        text_config=dict(model_type="deepseek_v3", hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24,
                         kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=4,
                         num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                         max_position_embeddings=128, initializer_range=0.1),
        vision_config=dict(num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                           pos_emb_height=4, pos_emb_width=4, pos_emb_time=2),
        projection_hidden_size=32, tie_word_embeddings=False)),
    # Llama 4: blocks 0-2 rotate and attend within 8-token chunks (the test windows are longer), unit-RMS q/k; block 3
    # NoPE, its queries' temperature growing every 4 tokens; blocks 1 and 3 route top-1 of 4 experts (fused, as
    # transformers always saves them) by a sigmoid weighting their input, beside a shared expert
    "llama4": ("Llama4TextConfig", LLAMA4_TEXT),
    # the image-text model as released: the language model under language_model., a vision tower and projector
    "llama4-image": ("Llama4Config", dict(text_config=LLAMA4_TEXT, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
        projector_input_dim=32, projector_output_dim=64, vision_output_dim=32))),
    "gemma4": ("Gemma4TextConfig", GEMMA4_TEXT),
    # Gemma 4 as the edge models (E2B, E4B) are made: per-layer inputs, 8 per block, from a table of 300 rows (more
    # than the vocabulary) and the embedding; the global blocks' values their own; blocks 2 and 3 reuse the keys and
    # values of blocks 0 and 1 (their layer types'), their MLPs twice as wide
    "gemma4-e2b": ("Gemma4TextConfig", dict(GEMMA4_TEXT, attention_k_eq_v=False, num_global_key_value_heads=None,
                                            hidden_size_per_layer_input=8, vocab_size_per_layer_input=300,
                                            num_kv_shared_layers=2, use_double_wide_mlp=True)),
    # the image-text model as released: the language model under model.language_model., a vision tower
    "gemma4-image": ("Gemma4Config", dict(text_config=GEMMA4_TEXT, audio_config=None, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16))),
    # GLM-5 and DeepSeek-V3.2: GLM-4.7-Flash's blocks with DeepSeek sparse attention, each query attending to the 8
    # earlier keys its indexer scores highest (the test windows are longer; GLM-5's indexer rotates interleaved pairs)
    "glm5": ("GlmMoeDsaConfig", dict(SPARSE_ATTENTION, mlp_layer_types=["dense", "sparse", "sparse"])),
    "deepseek-v3.2": ("DeepseekV32Config", dict(SPARSE_ATTENTION, first_k_dense_replace=1)),
}
# saved with every expert of a block in one tensor per projection (save_original_format=False), as released
FUSED = {"qwen3.5-moe-fused", "qwen3.5-moe-image", "gpt-oss"}
# built by their image-text class (transformers' AutoModelForCausalLM gives the language model alone)
IMAGE_TEXT = {"qwen3.5-moe-image": "Qwen3_5MoeForConditionalGeneration",
              "kimi-k2.5": "Kimi_K25ForConditionalGeneration",
              "llama4-image": "Llama4ForConditionalGeneration",
              "gemma4-image": "Gemma4ForConditionalGeneration"}


@functools.cache
def tokenizer_json() -> str:
    """A byte-level BPE tokenizer of VOCAB ids trained on Python's bundled help text."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], trainer)
    return tok.to_str()


@functools.cache
def special_tokenizer_json(bos: bool) -> str:
    """Like `tokenizer_json`, with the special tokens <s> (id 0) and </s> (id 1); with `bos`, a post-processor that
    puts <s> in front of every encoded text, as LLaMA's tokenizers do."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=["<s>", "</s>"])
    tok.train_from_iterator([topics[k] for k in sorted(topics)][:40], trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", 0)])
    return tok.to_str()


def sample_text(chars: int = 20000) -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[-chars:]


def build(path: Path, variant: str, dtype: torch.dtype = torch.float32, shard: str | None = None,
          seed: int = 0) -> Path:
    """Save a random model of `variant` with its tokenizer into `path`; `shard` e.g. "20KB" splits it."""
    import transformers

    cls_name, kwargs = VARIANTS[variant]
    if "text_config" in kwargs:  # an image-text model: the vocabulary is its language model's
        kwargs = {**kwargs, "text_config": {**kwargs["text_config"], "vocab_size": VOCAB}}
    else:
        kwargs = {**kwargs, "vocab_size": VOCAB}
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    if variant in IMAGE_TEXT:
        model = getattr(transformers, IMAGE_TEXT[variant])(config).to(dtype).eval()
    else:
        model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # give norms, biases and linear attention's decays non-trivial values so they are exercised
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
            elif name.endswith("sinks"):  # attention sinks of gpt-oss, large enough to take a share of the softmax
                p.copy_(torch.randn_like(p))
        for name, b in [*model.named_buffers(), *model.named_parameters()]:  # a router's selection bias, zero as
            if name.endswith("e_score_correction_bias"):                     # initialized, of the scores' size
                b.add_(torch.randn_like(b) * 0.03)
            elif name.endswith("layer_scalar"):  # Gemma 4's scale of each block's output, one as initialized
                b.uniform_(0.5, 1.5)
    path.mkdir(parents=True, exist_ok=True)
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, save_original_format=variant not in FUSED, **kw)
    if variant == "kimi-k2.5":  # transformers 5.25 saves its language model's layers as `blocks`, a name of its vision
        released_names(path, {"language_model.model.blocks.": "language_model.model.layers."})  # tower's
    (path / "tokenizer.json").write_text(tokenizer_json())
    return path


def released_names(path: Path, renames: dict[str, str]) -> None:
    """Rename the tensors of every shard of `path` whose names start with a key of `renames` (and its index)."""
    import json

    from safetensors.torch import load_file, save_file

    def rename(name: str) -> str:
        return next((new + name[len(old):] for old, new in renames.items() if name.startswith(old)), name)

    for shard in path.glob("*.safetensors"):
        save_file({rename(n): t for n, t in load_file(shard).items()}, shard, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {rename(n): s for n, s in data["weight_map"].items()}
        index.write_text(json.dumps(data))


def deep(folder: Path, config_class: str, fused: bool = False, **config: object) -> tuple[Path, Path]:
    """A random model deeper than the variants (a run long enough to be killed midway) saved into `folder`/model with
    the tokenizer (`fused`: its experts in 3-D tensors), and 40,000 characters of calibration text in
    `folder`/calib.txt."""
    import transformers

    torch.manual_seed(0)
    model = folder / "model"
    built = getattr(transformers, config_class)(vocab_size=VOCAB, **{"max_position_embeddings": 128, **config})
    transformers.AutoModelForCausalLM.from_config(built).save_pretrained(model, save_original_format=not fused)
    (model / "tokenizer.json").write_text(tokenizer_json())
    calib = folder / "calib.txt"
    calib.write_text(sample_text(40000))
    return model, calib


def hf_model(path: Path):
    import transformers

    # experts as a loop over the stored experts (the grouped-GEMM path refuses float64, which parity tests use); an
    # image-text model AutoModelForCausalLM does not take by its own class
    import json

    model_type = json.loads((path / "config.json").read_text())["model_type"]
    image_text = {"kimi_k25": transformers.Kimi_K25ForConditionalGeneration,
                  "llama4": transformers.Llama4ForConditionalGeneration,
                  "gemma4": transformers.Gemma4ForConditionalGeneration}
    cls = image_text.get(model_type, transformers.AutoModelForCausalLM)
    return cls.from_pretrained(path, dtype=torch.float32, experts_implementation="eager").eval()
