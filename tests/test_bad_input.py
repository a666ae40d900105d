"""Bad input through the real CLI: exit code 2, one line naming the culprit and the problem, no traceback."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from streamprune.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from streamprune.cli import app
from streamprune.errors import CheckpointError, StreamPruneError
from tests import tiny

runner = CliRunner()


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid single-file tiny llama (never modified: tests break copies of it)."""
    return tiny.build(tmp_path_factory.mktemp("base") / "llama", "llama")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    path = tiny.build(tmp_path_factory.mktemp("sharded") / "llama", "llama", shard="20KB")
    assert len(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values())) >= 2
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.txt"
    path.write_text(tiny.sample_text(4000))
    return path


@pytest.fixture
def model(base, tmp_path) -> Path:
    """A private copy of the valid model, to break."""
    return Path(shutil.copytree(base, tmp_path / "model"))


def fail(*args: object) -> str:
    """Run the CLI, check the bad-input contract, and return the one line of output."""
    result = runner.invoke(app, [str(a) for a in args])
    out = result.output
    assert "Traceback" not in out, out
    assert not isinstance(result.exception, Exception), repr(result.exception)
    assert result.exit_code == 2, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("error: "), out
    return lines[0]


def fail_eval(model_dir: Path, data: Path, *extra: object) -> str:
    return fail("eval", model_dir, "--data", data, *extra)


def assert_names(msg: str, *parts: object) -> None:
    for part in parts:
        assert str(part) in msg, f"{part!r} not in {msg!r}"


def edit_config(model_dir: Path, **changes: object) -> None:
    path = model_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def raw_safetensors(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand; `length` overrides the header-length field."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(n: int, start: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [start, start + 4 * n]}


# ---------------------------------------------------------------- model directory and config.json


def test_model_dir_missing_subprocess(tmp_path, text):
    """The installed console script, in a fresh process: stderr holds exactly one line."""
    missing = tmp_path / "no-such-model"
    exe = Path(sys.executable).parent / "streamprune"
    proc = subprocess.run([str(exe), "eval", str(missing), "--data", str(text)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert_names(lines[0], missing, "does not exist")


@pytest.mark.parametrize("command", [["eval", "--data", "x.txt"], ["plan"], ["run", "out"]])
def test_model_dir_missing_every_command(tmp_path, command):
    missing = tmp_path / "no-such-model"
    name, *rest = command
    rest = [str(tmp_path / r) if r in ("x.txt", "out") else r for r in rest]
    msg = fail(name, missing, *rest)
    assert_names(msg, missing, "does not exist")


def _delete_config(d: Path) -> None:
    (d / "config.json").unlink()


def _garble_config(d: Path) -> None:
    (d / "config.json").write_text('{"model_type": "llama",')


@pytest.mark.parametrize("breaker,expected", [
    (_delete_config, ["config.json", "missing"]),
    (_garble_config, ["config.json", "not valid JSON"]),
    (lambda d: edit_config(d, model_type="gpt2"),
     ["'gpt2'", "not supported", "llama", "mistral", "opt", "bloom", "qwen2", "qwen3", "phi3", "gemma2",
      "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe"]),
    (lambda d: edit_config(d, hidden_size=10**12), ["config.json", "hidden_size", str(10**12)]),
    (lambda d: edit_config(d, num_hidden_layers=-1), ["config.json", "=-1", "1..4096"]),
    (lambda d: edit_config(d, vocab_size=10**15), ["config.json", "vocab_size", str(10**15)]),
    (lambda d: edit_config(d, max_position_embeddings=10**12), ["config.json", "max_position_embeddings"]),
    (lambda d: edit_config(d, max_position_embeddings="128"), ["config.json", "max_position_embeddings='128'"]),
    (lambda d: edit_config(d, num_key_value_heads="4"), ["config.json", "num_key_value_heads='4'"]),
    (lambda d: edit_config(d, head_dim="16"), ["config.json", "head_dim='16'"]),
    (lambda d: edit_config(d, sliding_window="64"), ["config.json", "sliding_window='64'"]),
    (lambda d: edit_config(d, intermediate_size=128),
     ["model.layers.0.mlp", "[96, 64]", "config.json implies [128, 64]"]),
    (lambda d: edit_config(d, rms_norm_eps="1e-6"), ["config.json", "rms_norm_eps='1e-6'", "not a finite number"]),
    (lambda d: edit_config(d, tie_word_embeddings="no"), ["config.json", "tie_word_embeddings='no'", "true or false"]),
    (lambda d: edit_config(d, rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),
     ["config.json", "rope_theta='1e4'"]),
    (lambda d: edit_config(d, rope_parameters=[1, 2]), ["config.json", "rope_parameters=[1, 2]", "not an object"]),
    (lambda d: edit_config(d, partial_rotary_factor=1.5), ["config.json", "partial_rotary_factor=1.5", "not a fraction"]),
], ids=["missing", "invalid-json", "model-type", "hidden-size", "layers", "vocab", "positions", "positions-str",
        "kv-heads-str", "head-dim-str", "sliding-window-str", "shape", "eps-str", "tie-str", "rope-theta-str",
        "rope-list", "partial-rotary"])
def test_bad_config(model, text, breaker, expected):
    breaker(model)
    assert_names(fail_eval(model, text), *expected)


@pytest.fixture(scope="module")
def families(tmp_path_factory) -> dict[str, Path]:
    """Valid tiny models of the families whose config.json has fields the llama has not (never modified)."""
    root = tmp_path_factory.mktemp("families")
    return {v: tiny.build(root / v, v) for v in ("qwen3-window", "phi3-longrope", "gemma3", "gemma3-image", "gemma4",
                                                 "glm5", "llama4")}


@pytest.mark.parametrize("variant,changes,expected", [
    ("qwen3-window", dict(layer_types=["full_attention"]),
     ["config.json", "layer_types=['full_attention']", "2 layer types"]),
    ("qwen3-window", dict(layer_types=["full_attention", "block_sparse_attention"]),
     ["config.json", "'block_sparse_attention'", "not supported"]),
    ("qwen3-window", dict(layer_types=["full_attention", "chunked_attention"]),
     ["config.json", "chunked attention layers without attention_chunk_size"]),
    ("phi3-longrope", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 3,
                                            "long_factor": [1.0] * 8, "original_max_position_embeddings": 32}),
     ["config.json", "short_factor=[1.0, 1.0, 1.0]", "8 numbers"]),
    ("phi3-longrope", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0] * 8,
                                            "long_factor": [1.0] * 8}, original_max_position_embeddings="32"),
     ["config.json", "original_max_position_embeddings='32'"]),
    ("phi3-longrope", dict(rope_parameters={"rope_type": "ntk-by-parts", "rope_theta": 1e4, "factor": 4.0}),
     ["'ntk-by-parts'", "not supported"]),
    ("gemma3", dict(use_bidirectional_attention=True), ["config.json", "use_bidirectional_attention=True"]),
    ("gemma3", dict(final_logit_softcapping=-1.0), ["config.json", "final_softcap=-1.0", "not positive"]),
    ("gemma3-image", dict(text_config="gemma"), ["config.json", "text_config='gemma'", "not an object"]),
    ("gemma4", dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
     ["config.json", "Gemma 4 with routed experts beside the MLP (enable_moe_block)", "not supported"]),
    ("gemma4", dict(num_kv_shared_layers=3), ["config.json", "num_kv_shared_layers=3", "earlier block of their layer"]),
    ("glm5", dict(indexer_types=["full", "shared", "full"]),
     ["config.json", "indexer_types=", "another block's top-k keys", "not supported"]),
    ("glm5", dict(q_lora_rank=None), ["config.json", "sparse attention with q_lora_rank=0", "query latent"]),
    ("llama4", dict(no_rope_layers=[1, 1, 0]), ["config.json", "no_rope_layers=[1, 1, 0]", "is not 4 flags"]),
], ids=["layer-types-length", "layer-type-unknown", "chunk-size-missing", "longrope-factors", "longrope-original-str",
        "rope-type", "bidirectional", "softcap-negative", "text-config", "gemma4-moe", "gemma4-kv-shared-all",
        "dsa-shared-indexer", "dsa-no-query-latent", "llama4-nope-flags"])
def test_bad_family_config(families, tmp_path, text, variant, changes, expected):
    model = Path(shutil.copytree(families[variant], tmp_path / "model"))
    edit_config(model, **changes)
    assert_names(fail_eval(model, text), *expected)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory) -> Path:
    """A valid Qwen3.5-MoE with its experts stored fused (never modified)."""
    return tiny.build(tmp_path_factory.mktemp("hybrid") / "qwen3.5", "qwen3.5-moe-fused")


def _tensors(d: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(d / SINGLE_NAME)
    edit(tensors)
    save_file(tensors, d / SINGLE_NAME, metadata={"format": "pt"})


@pytest.mark.parametrize("breaker,expected", [
    (lambda d: _tensors(d, lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 48, 64)})),
     ["model.layers.0.mlp.experts.gate_up_proj has shape [4, 48, 64], config.json implies [4, 64, 64]"]),
    (lambda d: _tensors(d, lambda t: t.pop("model.layers.1.mlp.experts.down_proj")),
     ["missing 1 tensor(s)", "model.layers.1.mlp.experts.down_proj"]),
    (lambda d: _tensors(d, lambda t: t.pop("model.layers.2.linear_attn.A_log")),
     ["missing 1 tensor(s)", "model.layers.2.linear_attn.A_log"]),
    (lambda d: _tensors(d, lambda t: t.pop("model.layers.0.linear_attn.conv1d.weight")),
     ["missing 1 tensor(s)", "model.layers.0.linear_attn.conv1d.weight"]),
    (lambda d: edit_config(d, layer_types=["linear_attention", "mamba", "linear_attention", "full_attention"]),
     ["config.json", "'mamba'", "not supported", "linear_attention"]),
    (lambda d: edit_config(d, linear_num_value_heads=3), ["config.json", "3 value heads", "multiple of the key heads"]),
], ids=["fused-shape", "fused-down-missing", "linear-attention-tensor-missing", "conv-missing", "layer-type",
        "value-heads"])
def test_bad_hybrid_model(hybrid, tmp_path, text, breaker, expected):
    """Refused in one line before anything is written."""
    model = Path(shutil.copytree(hybrid, tmp_path / "model"))
    breaker(model)
    out = tmp_path / "out"
    assert_names(fail("run", model, out, "--calib", text, "--nsamples", "2", "--seqlen", "32"), *expected)
    assert not out.exists()


def test_absurd_config_refused_before_reading_weights(model, text, monkeypatch):
    """Refused from config.json alone: no shard is even opened, let alone a tensor allocated."""
    import streamprune.checkpoint as checkpoint

    edit_config(model, hidden_size=10**12, intermediate_size=10**12)
    monkeypatch.setattr(checkpoint, "scan_tensors", lambda *a, **k: pytest.fail("shards were scanned"))
    monkeypatch.setattr(checkpoint, "read_tensor", lambda *a, **k: pytest.fail("a tensor was read"))
    assert_names(fail_eval(model, text), "hidden_size", str(10**12))


def test_required_tensor_missing(model, text):
    tensors = load_file(model / SINGLE_NAME)
    del tensors["model.norm.weight"]
    save_file(tensors, model / SINGLE_NAME, metadata={"format": "pt"})
    assert_names(fail_eval(model, text), model, "missing 1 tensor(s)", "model.norm.weight")


# ---------------------------------------------------------------- safetensors files


@pytest.mark.parametrize("new_size,expected", [
    (lambda n: n // 2, ["truncated", "ends at byte"]),
    (lambda n: 100, ["header length", "impossible for a file of 100 bytes"]),
    (lambda n: 0, ["truncated", "0 bytes"]),
], ids=["in-data", "in-header", "empty"])
def test_shard_cut_short(model, text, new_size, expected):
    shard = model / SINGLE_NAME
    with open(shard, "r+b") as f:
        f.truncate(new_size(shard.stat().st_size))
    assert_names(fail_eval(model, text), shard, *expected)


@pytest.mark.parametrize("content,expected", [
    (raw_safetensors({}, length=2**63 + 5), ["header length", str(2**63 + 5), "impossible"]),
    (raw_safetensors(b'{"w": {"dtype": "F32",'), ["header is not valid JSON"]),
    (raw_safetensors(b"\xff\xfe{}"), ["header is not valid JSON"]),
    (raw_safetensors({"w": f32(4, 64)}, bytes(16)), ["'w'", "ends at byte", "the file has"]),
    (raw_safetensors({"a": f32(4, 0), "b": f32(4, 8)}, bytes(24)), ["'a'", "'b'", "overlap"]),
    (raw_safetensors({"w": {"dtype": "F12", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
     ["'w'", "unknown dtype 'F12'"]),
    (raw_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, bytes(16)),
     ["'w'", "spans 8 bytes", "needs 16"]),
    (raw_safetensors({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16)),
     ["'w'", "invalid shape"]),
], ids=["header-length", "header-json", "header-not-utf8", "offsets-past-end", "overlap", "dtype",
        "span-vs-shape", "negative-shape"])
def test_bad_safetensors_header(model, text, content, expected):
    shard = model / SINGLE_NAME
    shard.write_bytes(content)
    assert_names(fail_eval(model, text), shard, *expected)


# ---------------------------------------------------------------- sharded checkpoints


def _index(d: Path) -> dict[str, str]:
    return json.loads((d / INDEX_NAME).read_text())["weight_map"]


def _write_index(d: Path, weight_map: dict[str, str]) -> None:
    (d / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _two_shards(d: Path) -> tuple[str, str, str]:
    """A tensor, the shard holding it (along with other tensors, so it stays in the index), and another shard."""
    weight_map = _index(d)
    shards = list(weight_map.values())
    name = min(n for n, s in weight_map.items() if shards.count(s) > 1)
    other = sorted(set(weight_map.values()) - {weight_map[name]})[0]
    return name, weight_map[name], other


def _index_names_missing_shard(d: Path) -> list[str]:
    name, _, _ = _two_shards(d)
    _write_index(d, {**_index(d), name: "model-00099-of-00099.safetensors"})
    return [d / INDEX_NAME, "do not exist", "model-00099-of-00099.safetensors"]


def _tensor_in_two_shards(d: Path) -> list[str]:
    name, home, other = _two_shards(d)
    extra = load_file(d / other)
    extra[name] = load_file(d / home)[name]
    save_file(extra, d / other, metadata={"format": "pt"})
    return [repr(name), "stored twice", home, other]


def _index_points_to_wrong_shard(d: Path) -> list[str]:
    name, home, other = _two_shards(d)
    _write_index(d, {**_index(d), name: other})
    return [d / INDEX_NAME, repr(name), f"mapped to {other}", f"stored in {home}"]


def _index_names(shard: object) -> Callable[[Path], list[str]]:
    """The index maps a tensor to `shard`, which is not a plain file name in the model directory."""
    def breaker(d: Path) -> list[str]:
        name, _, _ = _two_shards(d)
        _write_index(d, {**_index(d), name: shard})
        return [d / INDEX_NAME, repr(shard), "not a file name inside the model directory"]
    return breaker


@pytest.mark.parametrize("breaker", [
    _index_names_missing_shard, _tensor_in_two_shards, _index_points_to_wrong_shard,
    _index_names(5), _index_names("../other/model.safetensors"), _index_names("/etc/passwd"),
    _index_names("sub/model.safetensors"), _index_names(".."),
], ids=["missing-shard", "stored-twice", "wrong-shard", "shard-not-string", "shard-dotdot", "shard-absolute",
        "shard-in-folder", "shard-parent"])
def test_bad_sharded_checkpoint(sharded, tmp_path, text, breaker):
    model = Path(shutil.copytree(sharded, tmp_path / "model"))
    expected = breaker(model)
    assert_names(fail_eval(model, text), *expected)


def test_shard_that_is_no_regular_file(model, tmp_path, text):
    (model / SINGLE_NAME).unlink()
    (tmp_path / "folder").mkdir()
    (model / SINGLE_NAME).symlink_to(tmp_path / "folder")
    assert_names(fail_eval(model, text), model / SINGLE_NAME, "not a regular file")


def test_dangling_symlinked_shard(model, tmp_path, text):
    (model / SINGLE_NAME).unlink()
    (model / SINGLE_NAME).symlink_to(tmp_path / "gone.safetensors")
    assert_names(fail_eval(model, text), model, "broken symlink", SINGLE_NAME)


def test_symlinked_shard_inside_model_dir_is_fine(model):
    (model / "blobs").mkdir()
    shutil.move(model / SINGLE_NAME, model / "blobs" / "abc123")
    (model / SINGLE_NAME).symlink_to(model / "blobs" / "abc123")
    assert Checkpoint(model).read("model.norm.weight").shape == (64,)


# ---------------------------------------------------------------- evaluation data and arguments


@pytest.mark.parametrize("name,content,extra,expected", [
    ("missing.txt", None, [], ["does not exist"]),
    ("empty.txt", b"", [], ["contains no text"]),
    ("blank.txt", b"  \n\t\r\n  \n", [], ["contains no text"]),
    ("latin.txt", b"\xff\xfe\x00bad", [], ["not UTF-8", "offset 0"]),
    ("notext.jsonl", b'{"text": "hello"}\n\n{"title": "no text here"}\n', [], [":3:", '"text" field']),
    ("broken.jsonl", b'{"text": "hello"}\n{"text": \n', [], [":2:", "not valid JSON"]),
    ("short.txt", b"one two three four five", ["--seqlen", "64"], ["shorter than one window of 64"]),
    ("ids.npy", np.array([1, 2, 300, 4]), [], ["300", "outside the vocabulary 0..255"]),
    ("neg.npy", np.array([1, -1, 2]), [], ["-1", "outside the vocabulary"]),
    ("float.npy", np.array([1.5, 2.0]), [], ["must be integers", "float64"]),
    ("garbage.npy", b"not a numpy file", [], ["not a readable .npy"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_eval_data(base, tmp_path, name, content, extra, expected):
    data = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(data, content)
    elif content is not None:
        data.write_bytes(content)
    assert_names(fail_eval(base, data, *extra), data, *expected)


def test_text_data_without_tokenizer(model, tmp_path, text):
    (model / "tokenizer.json").unlink()
    assert_names(fail_eval(model, text), model / "tokenizer.json", "missing", ".npy")


@pytest.mark.parametrize("extra,expected", [
    (["--seqlen", "256"], ["seqlen 256", "maximum positions (128)"]),
    (["--seqlen", "1"], ["seqlen 1", "too small"]),
    (["--seqlen", "0"], ["seqlen 0", "too small"]),
    (["--nsamples", "0", "--seqlen", "16"], ["nsamples 0", "at least 1"]),
], ids=["seqlen-too-long", "seqlen-too-short", "seqlen-zero", "nsamples-zero"])
def test_bad_eval_arguments(base, text, extra, expected):
    assert_names(fail_eval(base, text, *extra), *expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_requested_without_gpu(base, text):
    assert_names(fail_eval(base, text, "--device", "cuda"), "'cuda'", "no CUDA device")


# ---------------------------------------------------------------- I/O without asserts


@pytest.mark.parametrize("index", ['{"weight_map": []}', '{"metadata": {}}', "[1, 2]", '{"weight_map": "a"}'])
def test_malformed_index_under_python_O(sharded, tmp_path, text, index):
    """Validation never rests on `assert` (which `python -O` removes)."""
    model = Path(shutil.copytree(sharded, tmp_path / "model"))
    (model / INDEX_NAME).write_text(index)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-O", str(root / "cli.py"), "eval", str(model), "--data", str(text)],
                            capture_output=True, text=True, cwd=root)
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stdout + result.stderr
    assert_names(lines[0], "error: ", INDEX_NAME, "weight_map")


def test_short_reads_are_completed(base, tmp_path, monkeypatch):
    """One read(2) may return less than asked (Linux caps it near 2 GiB): shards and activation files are read
    in a loop until complete."""
    import os

    from streamprune.activations import DiskActivations

    reference = {name: Checkpoint(base).read(name) for name in ("model.norm.weight", "model.embed_tokens.weight")}
    store = DiskActivations((3, 16, 64), tmp_path / "act.f32")
    data = torch.randn(3, 16, 64)
    store.write(0, 3, data)
    real_readv, real_preadv = os.readv, os.preadv
    monkeypatch.setattr(os, "readv", lambda fd, bufs: real_readv(fd, [memoryview(bufs[0])[:1000]]))
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, at: real_preadv(fd, [memoryview(bufs[0])[:1000]], at))
    assert torch.equal(store.read(0, 3, torch.device("cpu")), data)
    ckpt = Checkpoint(base)
    assert all(torch.equal(ckpt.read(name), t) for name, t in reference.items())
    os.truncate(store.path, 1000)  # cut short behind the store's back: an error, never uninitialised memory
    with pytest.raises(StreamPruneError, match="act.f32: activation file ends after 1000 of"):
        store.read(0, 3, torch.device("cpu"))
    store.close()


def test_shard_cut_short_after_it_was_checked(model):
    ckpt = Checkpoint(model)
    with open(model / SINGLE_NAME, "r+b") as f:
        f.truncate(ckpt.tensors["model.norm.weight"].start + 8)
    with pytest.raises(CheckpointError, match=r"truncated while reading 'model.norm.weight' \(8 of 256 bytes\)"):
        ckpt.read("model.norm.weight")
