"""streamprune's streaming forward against transformers on tiny random models of every family."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from streamprune.calib import eval_windows, load_tokens
from streamprune.evaluate import evaluate, logits
from tests import tiny, tolerance


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(tiny.sample_text(12000))
    return path


def hf_perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            out = model(w[None]).logits[0]
            nll += F.cross_entropy(out[:-1], w[1:], reduction="sum").item()
            count += w.numel() - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("variant", sorted(tiny.VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    path = tiny.build(tmp_path / variant, variant)
    ids = torch.randint(0, tiny.VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny.hf_model(path)(ids).logits
    torch.testing.assert_close(logits(path, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", ["llama-gqa", "opt", "bloom", "qwen2", "qwen3", "phi3", "gemma2", "gemma3-image",
                                     "mixtral", "qwen2-moe", "qwen3-moe"])
def test_sharded_checkpoints_and_dtypes(tmp_path, variant, dtype):
    path = tiny.build(tmp_path / variant, variant, dtype=dtype, shard="30KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, tiny.VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # transformers upcasts the stored half-precision weights, as streamprune does
        ref = tiny.hf_model(path)(ids).logits
    torch.testing.assert_close(logits(path, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["llama", "mistral", "opt-proj", "bloom", "qwen3", "qwen3-window",
                                     "phi3-longrope", "gemma2", "gemma3", "gemma3-image", "qwen2-moe"])
def test_eval_perplexity_matches_transformers(tmp_path, data_file, variant):
    path = tiny.build(tmp_path / variant, variant)
    result = evaluate(path, data_file, seqlen=64, nsamples=6, device="cpu")
    tokens = load_tokens(data_file, path, tiny.VOCAB)
    windows = eval_windows(tokens, 64, 6)
    ref = hf_perplexity(tiny.hf_model(path), windows)
    assert result.windows == 6 and result.tokens == 6 * 63
    assert result.perplexity == pytest.approx(ref, rel=tolerance.perplexity(63, ref))  # float32 sums of 63 terms


def test_longrope_short_factors_within_the_original_context(tmp_path):
    """Windows no longer than original_max_position_embeddings (32) rotate by the short factors, longer ones by the
    long factors (test_logits_match_transformers), as transformers picks them by the window's length."""
    path = tiny.build(tmp_path / "m", "phi3-longrope")
    ids = torch.randint(0, tiny.VOCAB, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tiny.hf_model(path)(ids).logits
    torch.testing.assert_close(logits(path, ids), ref, atol=1e-4, rtol=0)


def test_sliding_window_beyond_seqlen_is_applied_exactly(tmp_path, data_file):
    """A window shorter than seqlen masks what lies farther back instead of refusing the length; the plan counts
    its (T, T) mask once per kind of block."""
    from streamprune.checkpoint import Checkpoint
    from streamprune.plan import positions_bytes

    path = tiny.build(tmp_path / "m", "qwen3-window")
    cfg = Checkpoint(path).config
    assert cfg.layer_types == ("full_attention", "sliding_attention") and cfg.sliding_window == 16
    assert positions_bytes(cfg, 64) == 2 * 2 * 64 * cfg.head_dim * 4 + 64 * 64 * 4  # cos, sin of both; one mask
    assert positions_bytes(cfg, 16) == 2 * 2 * 16 * cfg.head_dim * 4  # a window no shorter than T: no mask


@pytest.mark.parametrize("model_type,extra", [
    ("gemma2", {"rope_theta": 20000.0}),
    ("gemma3_text", {"rope_theta": 500000.0, "rope_local_base_freq": 5000.0, "sliding_window_pattern": 3,
                     "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    ("gemma3_text", {}),
])
def test_gemma_configs_without_layer_types_parse_as_transformers_reads_them(model_type, extra):
    """Configs as released (no layer_types, RoPE as rope_theta / rope_local_base_freq / rope_scaling) give the
    blocks the kinds and RoPE transformers gives them."""
    import transformers

    from streamprune.arch import resolve

    raw = {"model_type": model_type, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, **extra}
    ref = transformers.AutoConfig.for_model(**raw)
    _, cfg = resolve(raw)
    assert cfg.layer_types == tuple(ref.layer_types)
    if model_type == "gemma2":
        assert cfg.rope["rope_theta"] == ref.rope_parameters["rope_theta"] and cfg.rope_sliding is None
        assert (cfg.attn_softcap, cfg.final_softcap) == (ref.attn_logit_softcapping, ref.final_logit_softcapping)
    else:
        for ours, kind in ((cfg.rope, "full_attention"), (cfg.rope_sliding, "sliding_attention")):
            theirs = ref.rope_parameters[kind]
            assert (ours["rope_type"], ours["rope_theta"], ours.get("factor")) == \
                   (theirs["rope_type"], theirs["rope_theta"], theirs.get("factor")), kind
        assert cfg.attn_softcap is None
    assert cfg.sliding_window == ref.sliding_window and cfg.attn_scale == ref.query_pre_attn_scalar ** -0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gemma_embedding_scale_is_rounded_to_the_stored_dtype(tmp_path, dtype):
    """transformers multiplies the embedding by sqrt(hidden_size) as a tensor of the weights' dtype: 48 ** 0.5 =
    6.928 is 6.9375 in bfloat16; streamprune takes the scale of the checkpoint's stored dtype."""
    import transformers

    from streamprune.checkpoint import Checkpoint

    config = transformers.Gemma2Config(vocab_size=tiny.VOCAB, hidden_size=48, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=16)
    transformers.AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(tmp_path / "m")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
    embed = model.model.embed_tokens
    assert Checkpoint(tmp_path / "m").config.embed_scale == float(embed.embed_scale.to(embed.weight.dtype))
    assert Checkpoint(tmp_path / "m").config.embed_scale != 48 ** 0.5


def test_gemma3_image_text_checkpoint_layouts(tmp_path):
    """The language model of a Gemma 3 image-text checkpoint loads from either layout, `language_model.model.`
    (as saved) or `model.language_model.` (its module names, with lm_head at the top), tied or not; the vision
    tower's tensors are no roles and pass through."""
    from safetensors.torch import load_file, save_file

    from streamprune.checkpoint import Checkpoint

    path = tiny.build(tmp_path / "m", "gemma3-image")
    ids = torch.randint(0, tiny.VOCAB, (1, 40), generator=torch.Generator().manual_seed(6))
    before = logits(path, ids)
    ckpt = Checkpoint(path)
    vision = [n for n in ckpt.tensors if n.startswith(("vision_tower.", "multi_modal_projector."))]
    assert vision and all(ckpt.location[n] is None for n in vision)
    assert not any(name.startswith("vision") for name in ckpt.names.values())
    tensors = load_file(path / "model.safetensors")
    moved = {(("model.language_model." + k.removeprefix("language_model.model."))
              if k.startswith("language_model.model.") else "model." + k): v for k, v in tensors.items()}
    moved["lm_head.weight"] = moved["model.language_model.embed_tokens.weight"].clone() * 0.5
    save_file(moved, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with torch.no_grad():
        ref = tiny.hf_model(path)(ids).logits
    ours = logits(path, ids)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert not torch.allclose(ours, before, atol=1e-2)  # the untied head is read, not the embedding


def test_tokenization_matches_transformers_tokenizer(tmp_path, data_file):
    from transformers import PreTrainedTokenizerFast

    path = tiny.build(tmp_path / "m", "llama")
    ours = load_tokens(data_file, path, tiny.VOCAB)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))(data_file.read_text())["input_ids"]
    assert ours.tolist() == theirs


def test_llama3_rope_scaling_changes_frequencies():
    from streamprune.arch.layers import rope_inv_freq

    base = {"rope_type": "default", "rope_theta": 500000.0}
    scaled = {**base, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    a, b = rope_inv_freq(16, base, 64), rope_inv_freq(16, scaled, 64)
    assert torch.isclose(b[-1], a[-1] / 8) and not torch.equal(a, b)  # long wavelengths slow down 8x


def test_npy_and_jsonl_data(tmp_path, data_file):
    import json

    import numpy as np

    path = tiny.build(tmp_path / "m", "llama")
    text = evaluate(path, data_file, seqlen=64, nsamples=4, device="cpu")
    ids = load_tokens(data_file, path, tiny.VOCAB).numpy()
    np.save(tmp_path / "ids.npy", ids.astype(np.int32))
    npy = evaluate(path, tmp_path / "ids.npy", seqlen=64, nsamples=4, device="cpu")
    assert npy.perplexity == text.perplexity
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": p}) for p in data_file.read_text().split("\n\n")))
    assert evaluate(path, jsonl, seqlen=64, nsamples=4, device="cpu").tokens == 4 * 63


@pytest.mark.parametrize("variant,prefix", [("bloom", "transformer."), ("opt", "model.")])
def test_checkpoint_saved_without_base_model_prefix(tmp_path, variant, prefix):
    """Original BLOOM and OPT releases store names without `transformer.` / `model.`; they load the same."""
    from safetensors.torch import load_file, save_file

    path = tiny.build(tmp_path / variant, variant)
    ids = torch.randint(0, tiny.VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    before = logits(path, ids)
    tensors = load_file(path / "model.safetensors")
    save_file({k.removeprefix(prefix): v for k, v in tensors.items()}, path / "model.safetensors",
              metadata={"format": "pt"})
    assert not any(k.startswith(prefix) for k in load_file(path / "model.safetensors"))
    torch.testing.assert_close(logits(path, ids), before, atol=0, rtol=0)


def test_eval_streams_like_run(tmp_path, data_file):
    """eval reads blocks through the same iterator as run (NaN checks included) and places the windows' hidden
    states like run: on the device, in host memory or in a temporary file, with the same perplexity."""
    from safetensors.torch import load_file, save_file

    from streamprune.errors import StreamPruneError

    path = tiny.build(tmp_path / "m", "llama-gqa", dtype=torch.bfloat16)
    results = {p: evaluate(path, data_file, seqlen=64, nsamples=5, device="cpu", offload_activations=p, batch=2)
               for p in ("cpu", "disk")}
    assert results["disk"].offload_activations == "disk" and results["disk"].batch == 2
    assert results["disk"].perplexity == results["cpu"].perplexity
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][2, 3] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StreamPruneError, match=r"model.layers.1.mlp.up_proj.weight \(block 1\) contains NaN"):
        evaluate(path, data_file, seqlen=64, nsamples=2, device="cpu")
