"""Mixture-of-Experts end to end: output layout, routed token counts, the fallback rule, experts streamed one at a
time, stacked expert tensors refused, resume. (Each expert's inputs are re-derived in test_pipeline_parity.py.)"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import streamprune
from streamprune import stream
from streamprune.arch import PRUNABLE
from streamprune.checkpoint import Checkpoint
from streamprune.errors import CheckpointError
from streamprune.evaluate import logits
from tests import tiny

NSAMPLES, SEQLEN = 8, 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("moe")
    return {v: tiny.build(base / v, v) for v in ("mixtral", "qwen2-moe", "qwen3-moe", "glm4-moe", "minimax-m2",
                                                 "deepseek-v3", "deepseek-v3-plain", "qwen3-next", "qwen3.5-moe-fused",
                                                 "qwen3.5-moe-image", "gpt-oss", "hy-v3", "ernie4.5-moe",
                                                 "glm4.7-flash", "kimi-k2.5", "llama4", "llama4-image", "glm5",
                                                 "deepseek-v3.2")}


def stored(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor by the name the model uses (an expert stored fused: each of its linears)."""
    ckpt = Checkpoint(model_dir)
    return {name: ckpt.read(name) for name in ckpt.location}


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "no-sequential"])
@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe", "glm4-moe", "minimax-m2", "deepseek-v3",
                                     "deepseek-v3-plain", "qwen3-next", "qwen3.5-moe-fused", "qwen3.5-moe-image",
                                     "gpt-oss", "hy-v3", "ernie4.5-moe", "glm4.7-flash", "kimi-k2.5", "llama4",
                                     "llama4-image", "glm5", "deepseek-v3.2"])
def test_output_keeps_names_and_loads_in_transformers(tmp_path, calib, models, variant, sequential):
    src, out = models[variant], tmp_path / "out"
    report = streamprune.prune(src, out, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN, sequential=sequential)
    before, after = stored(src), stored(out)
    assert set(before) == set(after)
    ckpt = Checkpoint(src)
    experts = {n for n in ckpt.expert_of if n.endswith(".weight")}  # gpt-oss's expert biases are copied
    pruned = experts | {n for (param, b), n in ckpt.names.items() if b is not None and param[1] == "weight"
                        and param[0] in PRUNABLE}
    assert any("shared_expert" in n or "shared_mlp" in n for n in pruned) == (variant in ("qwen2-moe", "glm4-moe", "deepseek-v3",
                                                                      "deepseek-v3-plain", "qwen3-next",
                                                                      "qwen3.5-moe-fused", "qwen3.5-moe-image",
                                                                      "ernie4.5-moe", "hy-v3", "glm4.7-flash",
                                                                      "kimi-k2.5", "llama4", "llama4-image", "glm5",
                                                                      "deepseek-v3.2"))
    assert {n: info.shape for n, info in Checkpoint(out).tensors.items()} == \
        {n: info.shape for n, info in ckpt.tensors.items()}  # stored as the input is (experts fused or not)
    for name, t in after.items():
        assert t.dtype == before[name].dtype and t.shape == before[name].shape, name
        if name in pruned:
            assert float((t == 0).float().mean()) == pytest.approx(0.5, abs=0.01), name
        else:  # router, shared-expert gate, norms, embeddings: untouched
            assert torch.equal(t, before[name]), name
    assert {lr.name for lr in report.layers} == pruned  # every pruned linear is reported, each expert's included
    ids = torch.randint(0, tiny.VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny.hf_model(out)(ids).logits
    torch.testing.assert_close(logits(out, ids), ref, atol=1e-4, rtol=0)


def test_report_counts_each_experts_tokens(tmp_path, calib, models):
    src = models["qwen2-moe"]
    cfg = Checkpoint(src).config
    report = streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN,
                               moe_min_tokens=120)
    per_block: dict[int, dict[int, int]] = {}
    for lr in report.layers:
        if lr.expert is not None:
            per_block.setdefault(lr.block, {})[lr.expert] = lr.routed_tokens
            low = lr.routed_tokens < 120
            assert lr.statistics == ("all (fewer than 120 routed)" if low else "routed"), lr
    assert sorted(per_block) == [b for b in range(cfg.n_layers) if cfg.is_moe(b)]  # block 1 is dense
    for counts in per_block.values():  # every token goes to experts_per_tok distinct experts
        assert len(counts) == cfg.n_experts and sum(counts.values()) == NSAMPLES * SEQLEN * cfg.experts_per_tok
    assert any(c < 120 for counts in per_block.values() for c in counts.values())  # the fallback was exercised
    saved = json.loads((tmp_path / "out" / "streamprune_report.json").read_text())
    assert {"expert", "routed_tokens", "statistics"} <= set(saved["layers"][-1])


def test_all_tokens_calibration(tmp_path, calib, models):
    src = models["mixtral"]
    routed = streamprune.prune(src, tmp_path / "routed", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    every = streamprune.prune(src, tmp_path / "all", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN,
                              moe_calibration="all")
    assert {lr.statistics for lr in every.layers if lr.expert is not None} == {"all"}
    block0 = [[lr.routed_tokens for lr in r.layers if lr.block == 0] for r in (every, routed)]
    assert block0[0] == block0[1]  # the same routes into the first block's experts
    a, b = stored(tmp_path / "routed"), stored(tmp_path / "all")
    experts = set(Checkpoint(src).expert_of)
    assert all(torch.equal(a[n], b[n]) for n in a if n not in experts and "layers.0." in n)  # attention: the same
    assert not all(torch.equal(a[n], b[n]) for n in experts)
    with pytest.raises(streamprune.StreamPruneError, match="moe-calibration 'some' is not one of routed, all"):
        streamprune.prune(src, tmp_path / "bad", calib=calib, moe_calibration="some")


def test_experts_stream_one_at_a_time(tmp_path, calib, models, monkeypatch):
    """However many experts a block has, at most two are held as read (the one in flight and the next)."""
    ckpt = Checkpoint(models["qwen2-moe"])
    live: dict[tuple[int, int], int] = {}
    peak = {"experts": 0}
    real = stream.read_tensor

    def tracked(info):
        t = real(info)
        key = ckpt.expert_of.get(info.name)
        if key is not None:
            live[key] = live.get(key, 0) + 1
            weakref.finalize(t, lambda: live.__setitem__(key, live[key] - 1))
            gc.collect()
            peak["experts"] = max(peak["experts"], sum(1 for v in live.values() if v > 0))
        return t

    monkeypatch.setattr(stream, "read_tensor", tracked)
    streamprune.prune(models["qwen2-moe"], tmp_path / "out", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    assert ckpt.config.n_experts == 6 and 1 <= peak["experts"] <= 2, peak


def test_stacked_expert_tensors_are_refused(tmp_path, models):
    src = models["mixtral"]
    bad = tmp_path / "stacked"
    bad.mkdir()
    (bad / "config.json").write_text((src / "config.json").read_text())
    tensors = stored(src)
    names = [n for n in tensors if "layers.0.block_sparse_moe.experts." in n and ".w1." in n]
    stacked = torch.stack([tensors.pop(n) for n in sorted(names)])
    tensors["model.layers.0.block_sparse_moe.experts.gate_up_proj"] = stacked
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds every expert of a block in one 3-D tensor"):
        Checkpoint(bad)


def test_moe_resume_is_byte_identical(tmp_path, calib, models, monkeypatch):
    from tests.test_resume import checkpoint_files, fail_writes_after

    src = models["qwen2-moe"]
    ref = tmp_path / "ref"
    streamprune.prune(src, ref, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    out = tmp_path / "out"
    fail_writes_after(monkeypatch, 3)  # the globals, blocks 0 and 1: block 2 (experts) fails
    with pytest.raises(streamprune.StreamPruneError):
        streamprune.prune(src, out, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    monkeypatch.undo()
    report = streamprune.prune(src, out, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    assert report.resumed_at_block == 2
    assert checkpoint_files(out) == checkpoint_files(ref)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe", "qwen3-moe"])
def test_plan_counts_one_expert_at_a_time(models, variant):
    """The planner holds one expert (in flight, pruned, read ahead) and the routes, never a block's experts."""
    from streamprune.plan import plan

    ckpt = Checkpoint(models[variant])
    expert = sum(ckpt.tensors[n].nbytes for n in ckpt.experts[(0, 0)].values())
    every = sum(ckpt.tensors[n].nbytes for n in ckpt.expert_of if ckpt.expert_of[n][0] == 0)
    result = plan(models[variant], nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu")
    consumers = {what: nbytes for what, nbytes, _ in result.consumers}
    held = next(v for k, v in consumers.items() if k.startswith("routed experts"))
    assert held == 3 * expert and every == ckpt.config.n_experts * expert >= 4 * expert
    block = next(v for k, v in consumers.items() if k.startswith("block as read"))
    assert block == 2 * max(sum(ckpt.tensors[n].nbytes for n in ckpt.block_names(b)) for b in range(ckpt.config.n_layers))
    routes = next(v for k, v in consumers.items() if k.startswith("routes"))
    assert routes == NSAMPLES * SEQLEN * ckpt.config.experts_per_tok * 21


def test_cli_moe_options(tmp_path, calib, models):
    from typer.testing import CliRunner

    from streamprune.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(models["mixtral"]), str(out), "--calib", str(calib), "--nsamples", "4",
                                      "--seqlen", "32", "--moe-calibration", "all", "--moe-min-tokens", "10"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "streamprune_report.json").read_text())
    assert saved["args"]["moe_calibration"] == "all" and saved["args"]["moe_min_tokens"] == 10
    assert saved["fingerprint"]["args"]["moe_calibration"] == "all"
    bad = CliRunner().invoke(app, ["run", str(models["mixtral"]), str(tmp_path / "bad"), "--calib", str(calib),
                                   "--moe-min-tokens", "0"])
    assert bad.exit_code == 2 and "moe-min-tokens 0 must be at least 1" in bad.output


def test_magnitude_without_calibration_prunes_every_expert(tmp_path, models):
    report = streamprune.prune(models["qwen2-moe"], tmp_path / "out", method="magnitude")
    ckpt = Checkpoint(tmp_path / "out")
    assert {lr.name for lr in report.layers if lr.expert is not None} == set(ckpt.expert_of)
    assert all(float((ckpt.read(n) == 0).float().mean()) == 0.5 for n in ckpt.expert_of)


def with_mtp_layer(src: Path, dst: Path) -> Path:
    """`src` (GLM-4.5, 3 layers) with a multi-token-prediction layer as published: `model.layers.3.*` (a copy of the
    last block plus its projection and norms) in a shard of its own, config.json's num_nextn_predict_layers 1."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    last = {n: t for n, t in stored(src).items() if n.startswith("model.layers.2.")}
    mtp = {n.replace("model.layers.2.", "model.layers.3."): t.clone() for n, t in last.items()}
    d = mtp["model.layers.3.input_layernorm.weight"].shape[0]
    mtp.update({"model.layers.3.eh_proj.weight": torch.randn(d, 2 * d), "model.layers.3.enorm.weight": torch.ones(d),
                "model.layers.3.hnorm.weight": torch.ones(d), "model.layers.3.shared_head.norm.weight": torch.ones(d)})
    save_file(mtp, dst / "mtp.safetensors")
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    return dst


def test_mtp_layers_copied_or_left_out(tmp_path, calib, models):
    """Multi-token-prediction layers are copied bit for bit and named in the report; an output that removes routed
    experts leaves them out (their routers keep every expert) and says so in config.json and the report."""
    src = with_mtp_layer(models["glm4-moe"], tmp_path / "in")
    mtp = {n: t for n, t in stored(src).items() if n.startswith("model.layers.3.")}
    out = tmp_path / "out"
    report = streamprune.prune(src, out, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    after = stored(out)
    assert all(torch.equal(after[n], t) for n, t in mtp.items()) and len(mtp) > 10
    assert report.model["mtp_layers"] == [3] and report.model["mtp_written"] == "copied"
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not any(lr.block == 3 for lr in report.layers)
    out2 = tmp_path / "out2"
    report = streamprune.prune(src, out2, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN, prune_experts=0.5)
    assert not any(n.startswith("model.layers.3.") for n in stored(out2))
    assert report.model["mtp_written"] == "left out"
    config = json.loads((out2 / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 0 and config["n_routed_experts"] == 4
    ids = torch.randint(0, tiny.VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = tiny.hf_model(out2)(ids).logits
    torch.testing.assert_close(logits(out2, ids), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "no-sequential"])
def test_activations_on_disk_give_the_same_output(tmp_path, calib, models, sequential):
    """Experts read their tokens' rows from the activation file (and add their outputs there): the output equals the
    run's with the activations in memory, byte for byte."""
    src = models["deepseek-v3"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    streamprune.prune(src, ref, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN, sequential=sequential)
    report = streamprune.prune(src, out, calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN, sequential=sequential,
                               offload_activations="disk")
    io = report.activation_io
    assert set(io["blocks"]) == {"0", "1", "2"} and io["read_bytes"] == sum(b["read_bytes"] for b in io["blocks"].values())
    buffer = NSAMPLES * SEQLEN * 64 * 4
    assert io["blocks"]["0"]["written_bytes"] >= 2 * buffer and all(b["read_bytes"] > 0 for b in io["blocks"].values())
    assert stored(out).keys() == stored(ref).keys()
    assert all(torch.equal(t, stored(ref)[n]) for n, t in stored(out).items())


def test_disk_rows_read_and_add_only_the_rows_asked_for(tmp_path):
    """The activation file's rows: any index (unsorted, repeated, empty) reads and adds as the in-memory buffer does."""
    from streamprune.activations import Activations, DiskActivations

    g = torch.Generator().manual_seed(0)
    data = torch.randn(4, 16, 8, generator=g)
    memory, disk = Activations((4, 16, 8), torch.device("cpu")), DiskActivations((4, 16, 8), tmp_path / "a.f32")
    memory.write(0, 4, data)
    disk.write(0, 4, data)
    for index in (torch.tensor([5, 3, 4, 30, 31, 0, 17]), torch.tensor([2, 2, 9]), torch.tensor([], dtype=torch.long),
                  torch.arange(32)):
        assert torch.equal(disk.rows(1, 3, index, torch.device("cpu")), memory.rows(1, 3, index, torch.device("cpu")))
        values = torch.randn(len(index), 8, generator=g)
        disk.add_rows(1, 3, index, values)
        memory.add_rows(1, 3, index, values)
        assert torch.equal(disk.read(0, 4, torch.device("cpu")), memory.read(0, 4, torch.device("cpu")))
    disk.close()


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "no-sequential"])
@pytest.mark.parametrize("variant, removes", [("qwen3-moe", None), ("deepseek-v3", None), ("qwen3-moe", 0.4)],
                         ids=["qwen3-moe", "deepseek-v3", "removing-experts"])
def test_plan_gives_the_disk_bytes_a_block_moves(tmp_path, calib, models, variant, removes, sequential):
    """With the activations on disk, the planner's bytes read and written per block are what an MoE block of the run
    moves, exactly, when every expert is routed enough tokens (--moe-min-tokens 1)."""
    from streamprune.plan import plan

    src = models[variant]
    predicted = plan(src, nsamples=NSAMPLES, seqlen=SEQLEN, device="cpu", offload_activations="disk",
                     sequential=sequential, prune_experts=removes)
    report = streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN,
                               sequential=sequential, offload_activations="disk", moe_min_tokens=1,
                               prune_experts=removes)
    block = report.activation_io["blocks"]["1"]  # an MoE block (block 0 also counts the embedding's write)
    assert (block["read_bytes"], block["written_bytes"]) == (predicted.disk_read_per_block,
                                                             predicted.disk_written_per_block)
    assert predicted.disk_read_per_block > 0


def fused_copy(src: Path, dst: Path) -> Path:
    """`src` (per-expert tensors) saved by transformers with every expert of a block in 3-D tensors."""
    model = tiny.hf_model(src)
    model.save_pretrained(dst, save_original_format=False)
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    return dst


def test_fused_and_per_expert_prune_alike(tmp_path, calib, models):
    """The same model stored per expert and fused: the same pruned weights bit for bit (each fused slice is its
    expert's gate rows, then its up rows), the same perplexity; each output stored as its input is."""
    per_expert = tiny.build(tmp_path / "per-expert", "qwen3.5-moe")
    fused = fused_copy(per_expert, tmp_path / "fused")
    args = dict(calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN, eval=calib, eval_nsamples=4, eval_seqlen=SEQLEN)
    a = streamprune.prune(per_expert, tmp_path / "a", **args)
    b = streamprune.prune(fused, tmp_path / "b", **args)
    assert a.perplexity == b.perplexity and [lr.name for lr in a.layers] == [lr.name for lr in b.layers]
    ours, theirs = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "b")
    assert ours.layout.fused == {} and len(theirs.layout.fused) == 3 * 4 * 4  # (gate, up, down) x experts x blocks
    assert set(ours.location) == set(theirs.location)
    for name in ours.location:
        assert torch.equal(ours.read(name), theirs.read(name)), name
    stored_b = {n: info.shape for n, info in theirs.tensors.items() if ".experts." in n}
    assert stored_b["model.layers.0.mlp.experts.gate_up_proj"] == (4, 64, 64) and len(stored_b) == 8


def test_fused_experts_stream_one_slice_at_a_time(tmp_path, calib, models, monkeypatch):
    """A fused tensor is read one expert's slice at a time, never whole: at most two experts' slices are held."""
    src = models["qwen3.5-moe-fused"]
    fused = {p.tensor for p in Checkpoint(src).layout.fused.values()}
    live: dict[int, int] = {}
    peak = {"experts": 0, "whole": 0}
    real = stream.read_tensor

    def tracked(info):
        t = real(info)
        peak["whole"] += info.name in fused
        if "[" in info.name:
            key = int(info.name.split("[")[1].rstrip("]"))
            live[key] = live.get(key, 0) + 1
            weakref.finalize(t, lambda: live.__setitem__(key, live[key] - 1))
            gc.collect()
            peak["experts"] = max(peak["experts"], sum(1 for v in live.values() if v > 0))
        return t

    monkeypatch.setattr(stream, "read_tensor", tracked)
    streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    assert peak["whole"] == 0 and 1 <= peak["experts"] <= 2, peak


def with_qwen_mtp(src: Path, dst: Path) -> Path:
    """`src` (Qwen3.5-MoE) with a multi-token-prediction layer as Qwen3.5 is published: `mtp.fc`, `mtp.norm`, its
    pre-norms and `mtp.layers.0.*` (a copy of the last block as stored, its experts fused where the block's are) in a
    shard of their own; mtp_num_hidden_layers 1."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    prefix = "model.language_model.layers.3." if "qwen3_5_moe\"" in (src / "config.json").read_text() else \
        "model.layers.3."
    tensors = {n: t for n, t in load_file(src / "model.safetensors").items() if n.startswith(prefix)}
    assert any(n.endswith("experts.gate_up_proj") for n in tensors) == (src.name == "qwen3.5-moe-image")
    mtp = {n.replace(prefix, "mtp.layers.0."): t.clone() for n, t in tensors.items()}
    d = mtp["mtp.layers.0.input_layernorm.weight"].shape[0]
    mtp.update({"mtp.fc.weight": torch.randn(d, 2 * d), "mtp.norm.weight": torch.ones(d),
                "mtp.pre_fc_norm_embedding.weight": torch.ones(d), "mtp.pre_fc_norm_hidden.weight": torch.ones(d)})
    save_file(mtp, dst / "mtp.safetensors")
    config = json.loads((dst / "config.json").read_text())
    text = config.get("text_config", config)
    text["mtp_num_hidden_layers"] = 1
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_qwen_mtp_layers_copied_or_left_out(tmp_path, calib, models):
    """Qwen3.5's `mtp.*` layers are copied bit for bit and named in the report (layer 4, past the model's 4); with
    experts removed they are left out and text_config's mtp_num_hidden_layers set to 0."""
    src = with_qwen_mtp(models["qwen3.5-moe-image"], tmp_path / "in")  # the MTP layer's experts fused too
    mtp = {n: t for n, t in stored(src).items() if n.startswith("mtp.")}
    report = streamprune.prune(src, tmp_path / "out", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN)
    after = stored(tmp_path / "out")
    assert len(mtp) > 10 and all(torch.equal(after[n], t) for n, t in mtp.items())
    assert report.model["mtp_layers"] == [4] and report.model["mtp_written"] == "copied"
    report = streamprune.prune(src, tmp_path / "out2", calib=calib, nsamples=NSAMPLES, seqlen=SEQLEN,
                               prune_experts=0.5)
    assert not any(n.startswith("mtp.") for n in stored(tmp_path / "out2"))
    assert report.model["mtp_written"] == "left out"
    text = json.loads((tmp_path / "out2" / "config.json").read_text())["text_config"]
    assert text["mtp_num_hidden_layers"] == 0 and text["num_experts"] == 2
