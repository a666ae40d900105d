"""End to end on tiny random models: `streamprune run` output is an ordinary checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import streamprune
from streamprune.calib import calib_windows
from streamprune.checkpoint import Checkpoint
from streamprune.cli import app
from streamprune.evaluate import evaluate, logits
from streamprune.pruners import Pattern
from tests import tiny, tolerance


def stored(model_dir) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint(model_dir)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def pruned_names(model_dir) -> set[str]:
    ckpt = Checkpoint(model_dir)
    return {name for ((role, kind), bid), name in ckpt.names.items()
            if bid is not None and kind == "weight" and role.value in {
                "attn_q", "attn_k", "attn_v", "attn_qkv", "attn_out", "ffn_gate", "ffn_up", "ffn_gate_up", "ffn_down"}}


@pytest.mark.parametrize("variant,dtype", [("llama-gqa", torch.float32), ("qwen2", torch.bfloat16),
                                           ("opt-proj", torch.float16), ("bloom", torch.float32),
                                           ("qwen3", torch.bfloat16), ("phi3-longrope", torch.float16),
                                           ("gemma2", torch.bfloat16), ("gemma3-image", torch.float32)])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_output_is_an_ordinary_checkpoint(tmp_path, calib, variant, dtype, method):
    src = tiny.build(tmp_path / "in", variant, dtype=dtype, shard="40KB")
    out = tmp_path / "out"
    report = streamprune.prune(src, out, method=method, sparsity=0.5, calib=calib, nsamples=8, seqlen=64)
    before, after = stored(src), stored(out)
    assert before.keys() == after.keys()
    prunable = pruned_names(src)
    assert len(report.layers) == len(prunable)
    for name, t in after.items():
        assert t.dtype == before[name].dtype, name
        if name in prunable:
            assert int((t == 0).sum()) >= int(0.5 * t.numel()), name
        else:  # embeddings, norms, biases, positions, lm_head: bit for bit
            assert torch.equal(t.view(torch.uint8), before[name].view(torch.uint8)), name
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(after)

    ids = torch.randint(0, tiny.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = tiny.hf_model(out)(ids).logits
    torch.testing.assert_close(logits(out, ids), hf, atol=1e-4, rtol=0)


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda", "magnitude"])
def test_nm_output(tmp_path, calib, method, pattern):
    src = tiny.build(tmp_path / "in", "llama")
    out = tmp_path / "out"
    report = streamprune.prune(src, out, method=method, pattern=pattern, calib=calib, nsamples=4, seqlen=64)
    pat = Pattern.parse(pattern)
    after = stored(out)
    for name in pruned_names(src):
        w = after[name]
        groups = (w == 0).view(w.shape[0], -1, pat.m).sum(-1)
        assert torch.all(groups >= pat.n), name
    assert report.args["sparsity"] == pat.n / pat.m


def test_report_contents(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "llama")
    out = tmp_path / "out"
    report = streamprune.prune(src, out, calib=calib, nsamples=4, seqlen=64)
    saved = json.loads((out / "streamprune_report.json").read_text())
    assert saved["args"]["method"] == "sparsegpt" and saved["args"]["nsamples"] == 4
    assert len(saved["layers"]) == 3 * 7
    for layer in saved["layers"]:
        assert layer["sparsity"] >= 0.5 and 0 < layer["rel_error"] < 1 and layer["seconds"] >= 0
        assert layer["damp"] == 0.01
    assert set(saved["phases"]) == {"read", "replay", "owl", "calibrate", "hessian", "solve", "error", "forward", "eval",
                                    "sync", "write", "survey"}
    assert saved["experts"] is None  # no routed expert removed
    assert saved["phases"]["owl"] == 0 and saved["block_sparsity"] == [0.5] * 3 and saved["allocation"] is None
    assert set(saved["block_phases"]) == {"0", "1", "2"}
    assert all(saved["block_phases"]["1"][p] > 0 for p in ("calibrate", "hessian", "solve", "error", "forward"))
    assert saved["peak_rss_bytes"] > 0 and saved["wall_seconds"] > 0
    assert report.total_sparsity >= 0.5


def test_sequential_uses_pruned_predecessors(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "llama")
    seq = streamprune.prune(src, tmp_path / "a", calib=calib, nsamples=4, seqlen=64)
    one = streamprune.prune(src, tmp_path / "b", calib=calib, nsamples=4, seqlen=64, sequential=False)
    first = [(lr.rel_error, lr2.rel_error) for lr, lr2 in zip(seq.layers, one.layers)]
    assert first[0][0] == first[0][1]  # q_proj of block 0 sees the same dense input either way
    assert any(a != b for a, b in first[3:7])  # o_proj onwards see pruned q/k/v only when sequential


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_hessian_offload_changes_no_byte(tmp_path, calib, monkeypatch, method):
    """The run with X^T X waiting in host memory during each solve (what a small GPU budget picks)
    writes the same bytes and reports the same rows as the run without."""
    import dataclasses

    from streamprune import job

    src = tiny.build(tmp_path / "in", "llama-gqa", dtype=torch.bfloat16)
    plain = streamprune.prune(src, tmp_path / "plain", method=method, calib=calib, nsamples=4, seqlen=64,
                              layer_errors=True)
    decide = job.decide
    monkeypatch.setattr(job, "decide", lambda *a, **k: dataclasses.replace(decide(*a, **k), offload_hessian=True))
    offloaded = streamprune.prune(src, tmp_path / "offloaded", method=method, calib=calib, nsamples=4, seqlen=64,
                                  layer_errors=True)
    assert offloaded.args["offload_hessian"] and not plain.args["offload_hessian"]
    a, b = stored(tmp_path / "plain"), stored(tmp_path / "offloaded")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [(lr.name, lr.rel_error, lr.sparsity) for lr in plain.layers] == \
           [(lr.name, lr.rel_error, lr.sparsity) for lr in offloaded.layers]


def test_magnitude_needs_no_calibration(tmp_path):
    src = tiny.build(tmp_path / "in", "opt")
    report = streamprune.prune(src, tmp_path / "out", method="magnitude")
    assert all(lr.rel_error is None for lr in report.layers)
    assert report.total_sparsity >= 0.5


def test_eval_of_output_matches_transformers_perplexity(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "llama")
    out = tmp_path / "out"
    streamprune.prune(src, out, method="wanda", calib=calib, nsamples=4, seqlen=64)
    ours = evaluate(out, calib, seqlen=64, nsamples=4, device="cpu")
    from tests.test_parity import hf_perplexity
    from streamprune.calib import eval_windows, load_tokens

    windows = eval_windows(load_tokens(calib, out, tiny.VOCAB), 64, 4)
    ref = hf_perplexity(tiny.hf_model(out), windows)
    assert ours.perplexity == pytest.approx(ref, rel=tolerance.perplexity(63, ref))  # float32 sums of 63 terms


def test_cli_run_prints_summary(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "bloom")
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "out"), "--calib", str(calib),
                                      "--nsamples", "4", "--seqlen", "64", "--pattern", "2:4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "total sparsity" in result.output and "streamprune_report.json" in result.output


FAMILIES = ["qwen3", "phi3-longrope", "gemma2", "gemma3", "gemma3-image", "qwen3.5", "gemma4", "gemma4-image",
            "gemma4-e2b"]


@pytest.mark.parametrize("variant", FAMILIES)
def test_family_through_the_cli(tmp_path, calib, variant):
    """run (each method, 2:4), eval and plan from the command line: the output holds the pattern, reloads in
    transformers with the logits streamprune computes, and evaluates to transformers' perplexity."""
    from streamprune.calib import eval_windows, load_tokens
    from tests.test_parity import hf_perplexity

    src = tiny.build(tmp_path / "in", variant)
    ids = torch.randint(0, tiny.VOCAB, (1, 48), generator=torch.Generator().manual_seed(5))
    for method in ("sparsegpt", "wanda", "magnitude"):
        out = tmp_path / method
        result = CliRunner().invoke(app, ["run", str(src), str(out), "--method", method, "--calib", str(calib),
                                          "--nsamples", "4", "--seqlen", "64", "--pattern", "2:4", "--device", "cpu"])
        assert result.exit_code == 0, result.output
        after = stored(out)
        names = pruned_names(src)
        assert names and all(torch.all((after[n] == 0).view(after[n].shape[0], -1, 4).sum(-1) >= 2) for n in names)
        with torch.no_grad():
            hf = tiny.hf_model(out)(ids).logits
        torch.testing.assert_close(logits(out, ids), hf, atol=1e-4, rtol=0)
    result = CliRunner().invoke(app, ["eval", str(out), "--data", str(calib), "--seqlen", "64", "--nsamples", "4",
                                      "--device", "cpu", "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "eval.json").read_text())["perplexity"]
    windows = eval_windows(load_tokens(calib, out, tiny.VOCAB), 64, 4)
    ref = hf_perplexity(tiny.hf_model(out), windows)
    assert ours == pytest.approx(ref, rel=tolerance.perplexity(63, ref))  # float32 sums of 63 terms
    result = CliRunner().invoke(app, ["plan", str(src), "--seqlen", "64", "--nsamples", "4", "--device", "cpu",
                                      "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "plan.json").read_text())["host_peak_bytes"] > 0


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.2"], "outside [0, 1)"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "half"], "not 'unstructured' or N:M"),
    (["--method", "obs"], "obs"),
    (["--sparsity", "0.6", "--pattern", "2:4"], "contradicts"),
    (["--calib", "MISSING"], "does not exist"),
    (["--calib", "SHORT", "--seqlen", "64"], "shorter than one calibration window"),
    (["--method", "wanda"], "needs calibration data"),
    (["--seqlen", "4096", "--calib", "CALIB"], "exceeds the model's maximum"),
])
def test_bad_run_arguments(tmp_path, calib, args, message):
    src = tiny.build(tmp_path / "in", "llama")
    (tmp_path / "short.txt").write_text("only a few words here")
    subst = {"MISSING": str(tmp_path / "nope.txt"), "SHORT": str(tmp_path / "short.txt"), "CALIB": str(calib)}
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(src), str(out), *[subst.get(a, a) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_out_dir_inside_model_dir_is_refused(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "llama")
    for out in (src, src / "pruned"):
        result = CliRunner().invoke(app, ["run", str(src), str(out), "--calib", str(calib), "--seqlen", "64"])
        assert result.exit_code == 2 and "inside MODEL_DIR" in result.output
    assert not (src / "pruned").exists()


def test_out_dir_not_writable_or_not_empty(tmp_path, calib):
    src = tiny.build(tmp_path / "in", "llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["run", str(src), str(busy), "--method", "magnitude"])
    assert result.exit_code == 2 and "not empty" in result.output
    result = CliRunner().invoke(app, ["run", str(src), str(busy), "--method", "magnitude", "--overwrite"])
    assert result.exit_code == 0 and (busy / "notes.txt").read_text() == "keep me"
    # /proc refuses new files even to root
    result = CliRunner().invoke(app, ["run", str(src), "/proc/streamprune-out", "--method", "magnitude"])
    assert result.exit_code == 2 and "not writable" in result.output, result.output


def test_restart_never_deletes_files_it_does_not_own(tmp_path, calib):
    """--restart starts a run of streamprune over; only --overwrite may replace other checkpoint files."""
    src = tiny.build(tmp_path / "in", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.safetensors").write_bytes(b"precious")
    (out / "notes.tmp").write_text("keep me")
    result = CliRunner().invoke(app, ["run", str(src), str(out), "--method", "magnitude", "--restart"])
    assert result.exit_code == 2 and "holds no run of streamprune" in result.output, result.output
    assert (out / "mine.safetensors").read_bytes() == b"precious"
    # an unfinished run of another job in the same folder: --restart replaces what that run wrote, nothing else
    streamprune.prune(src, out, method="magnitude", overwrite=True)
    assert not (out / "mine.safetensors").exists() and (out / "notes.tmp").read_text() == "keep me"
    (out / "mine.safetensors").write_bytes(b"precious")
    (out / "model.safetensors.index.json").unlink()  # an unfinished run
    (out / ".streamprune").mkdir()
    (out / ".streamprune" / "journal.json").write_text(
        json.dumps({"fingerprint": {"model": "x", "calib": None, "args": {}}, "done": {}}))
    result = CliRunner().invoke(app, ["run", str(src), str(out), "--method", "magnitude"])
    assert result.exit_code == 2 and "holds a different run" in result.output, result.output
    result = CliRunner().invoke(app, ["run", str(src), str(out), "--method", "magnitude", "--restart"])
    assert result.exit_code == 0, result.output
    assert (out / "mine.safetensors").read_bytes() == b"precious" and (out / "notes.tmp").read_text() == "keep me"
    assert Checkpoint(out).config.n_layers == 3


def hub_cache_layout(model: Path, cache: Path, rev: str = "0123abcd") -> Path:
    """Move `model` into the layout of the Hugging Face cache: every file a blob named by its hash, linked
    from snapshots/<rev>/ by a relative symlink; returns the snapshot folder (what users pass)."""
    import hashlib

    repo = cache / "models--streamprune--tiny"
    snapshot = repo / "snapshots" / rev
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for path in sorted(model.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        path.rename(blob)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    model.rmdir()
    return snapshot


def test_models_in_the_hugging_face_cache_load_without_flags(tmp_path, calib):
    from streamprune.plan import plan

    plain = tiny.build(tmp_path / "plain", "llama-gqa", shard="30KB")
    snapshot = hub_cache_layout(tiny.build(tmp_path / "cached", "llama-gqa", shard="30KB"), tmp_path / "hub")
    assert all(p.is_symlink() for p in snapshot.iterdir()) and (snapshot / "model.safetensors.index.json").exists()
    args = ["--calib", str(calib), "--nsamples", "4", "--seqlen", "64", "--device", "cpu"]
    for model, out in ((plain, tmp_path / "out-plain"), (snapshot, tmp_path / "out-cached")):
        result = CliRunner().invoke(app, ["run", str(model), str(out), *args])
        assert result.exit_code == 0, result.output
    assert stored(tmp_path / "out-plain").keys() == stored(tmp_path / "out-cached").keys()
    assert all(torch.equal(a, b) for a, b in zip(stored(tmp_path / "out-plain").values(),
                                                 stored(tmp_path / "out-cached").values()))
    assert not any(p.is_symlink() for p in (tmp_path / "out-cached").iterdir())  # config and tokenizer copied
    result = CliRunner().invoke(app, ["eval", str(snapshot), "--data", str(calib), "--seqlen", "64", "--nsamples", "2"])
    assert result.exit_code == 0 and "perplexity" in result.output, result.output
    assert evaluate(snapshot, calib, seqlen=64, nsamples=2).perplexity == \
        evaluate(plain, calib, seqlen=64, nsamples=2).perplexity
    assert plan(snapshot, nsamples=4, seqlen=64, device="cpu").host_peak > 0
    result = CliRunner().invoke(app, ["run", str(snapshot), str(snapshot / "pruned"), *args])
    assert result.exit_code == 2 and "inside MODEL_DIR" in result.output, result.output


def test_method_knobs_belong_to_the_method(tmp_path, calib):
    """SparseGPT's --blocksize and --damp are neither checked nor fingerprinted for Wanda; Wanda keeps only the
    column norms it reads unless the reconstruction errors are asked for."""
    from streamprune.plan import plan
    from streamprune.pruners import make_pruner

    src = tiny.build(tmp_path / "in", "bloom-6heads")  # widths 96 and 384, divisible by 3
    args = ["--calib", str(calib), "--nsamples", "4", "--seqlen", "96", "--method", "wanda", "--pattern", "1:3"]
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "out"), *args])  # 1:3 with --blocksize 128
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "streamprune_report.json").read_text())
    assert "blocksize" not in report["fingerprint"]["args"] and "damp" not in report["fingerprint"]["args"]
    assert all(layer["rel_error"] is None for layer in report["layers"])
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "out"), *args, "--blocksize", "7"])
    assert result.exit_code == 0 and "different run" not in result.output, result.output  # nothing to redo
    result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "sgpt"), *args[:-4], "--pattern", "1:3"])
    assert result.exit_code == 2 and "blocksize 128 must be a positive multiple of M=3" in result.output
    wanda = make_pruner("wanda", 96, torch.device("cpu"), 0.5, Pattern())
    assert wanda.xtx is None and wanda.sqnorms is not None and wanda.sqnorms.shape == (96,)
    plans = {e: dict((w, b) for w, b, _ in plan(src, method="wanda", seqlen=64, layer_errors=e).consumers)
             for e in (False, True)}
    key = "X^T X of the inputs being calibrated and pruned"
    assert plans[False][key] == 384 * 4 and plans[True][key] == 384 * 384 * 4  # the down projection's input
    with_errors = streamprune.prune(src, tmp_path / "errors", method="wanda", calib=calib, nsamples=4, seqlen=64,
                                    layer_errors=True)
    assert all(0 < lr.rel_error < 1 for lr in with_errors.layers)


def routed_expert_inputs(model_dir: Path, windows: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """The rows that transformers' Mixtral sends to each (block, expert) on `windows`: the MoE input of each token
    routed to it."""
    model = tiny.hf_model(model_dir)
    seen: dict[tuple[int, int], list[torch.Tensor]] = {}

    def grab(bid: int):
        def hook(experts, args):
            hidden, chosen = args[0], args[1]  # (tokens, D), (tokens, k)
            for xid in range(experts.num_experts):
                seen.setdefault((bid, xid), []).append(hidden[(chosen == xid).any(dim=-1)].detach())
        return hook

    hooks = [layer.mlp.experts.register_forward_pre_hook(grab(b)) for b, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(windows, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {key: torch.cat(rows).double() for key, rows in seen.items()}


def expert_errors(src: Path, out: Path, windows: torch.Tensor) -> dict[tuple[int, int, str], tuple[int, float]]:
    """Per (block, expert, role): the tokens routed to the expert in the pruned model and the relative error
    ||(W - W')X||^2 / ||WX||^2 of its pruned linear on them (the down projection's X from the pruned gate and up
    projections, as --sequential computes it), recomputed in float64 from transformers' routing."""
    dense, pruned = stored(src), stored(out)
    errors = {}
    for (bid, xid), x in routed_expert_inputs(out, windows).items():
        name = f"model.layers.{bid}.block_sparse_moe.experts.{xid}.{{}}.weight"
        w = {k: dense[name.format(k)].double() for k in ("w1", "w2", "w3")}
        p = {k: pruned[name.format(k)].double() for k in ("w1", "w2", "w3")}
        hidden = torch.nn.functional.silu(x @ p["w1"].T) * (x @ p["w3"].T)
        for role, k, inp in (("ffn_gate_exp", "w1", x), ("ffn_up_exp", "w3", x), ("ffn_down_exp", "w2", hidden)):
            err = float(((inp @ (w[k] - p[k]).T) ** 2).sum() / ((inp @ w[k].T) ** 2).sum())
            errors[(bid, xid, role)] = (x.shape[0], err)
    return errors


def test_sparsegpt_beats_magnitude_on_every_routed_expert(tmp_path, calib):
    """The report's rel_error of each expert linear is its error on the tokens routed to that expert (checked
    against transformers' routing), and SparseGPT's is below magnitude's on every expert that received tokens."""
    src = tiny.build(tmp_path / "in", "mixtral")
    seqlen, nsamples = 64, 8
    windows = calib_windows(calib, src, tiny.VOCAB, seqlen, nsamples, 0)
    rows, errors = {}, {}
    for method in ("magnitude", "sparsegpt"):
        out = tmp_path / method
        report = streamprune.prune(src, out, method=method, sparsity=0.5, calib=calib, nsamples=nsamples,
                                   seqlen=seqlen, layer_errors=True, moe_min_tokens=1,  # no expert falls back
                                   device="cpu")
        rows[method] = {(lr.block, lr.expert, lr.role): lr for lr in report.layers if lr.expert is not None}
        recomputed = expert_errors(src, out, windows)
        assert rows[method].keys() == recomputed.keys()
        for key, lr in rows[method].items():
            tokens, err = recomputed[key]
            assert lr.routed_tokens == tokens, (method, key)
            if tokens:
                assert lr.statistics == "routed"
                assert lr.rel_error == pytest.approx(err, rel=1e-4), (method, key)
        errors[method] = recomputed
    routed = [key for key, lr in rows["sparsegpt"].items() if lr.routed_tokens and rows["magnitude"][key].routed_tokens]
    assert len(routed) >= 18, routed  # 2 blocks x 4 experts x 3 linears, all but a few experts routed to
    reported = {key: (rows["sparsegpt"][key].rel_error, rows["magnitude"][key].rel_error) for key in routed}
    assert all(ours < theirs for ours, theirs in reported.values()), reported
    # the same on the routed tokens as transformers finds them: statistics taken from the wrong rows would still
    # win on the report rows, which measure each solve on its own statistics
    truth = {key: (errors["sparsegpt"][key][1], errors["magnitude"][key][1]) for key in routed}
    assert all(ours < theirs for ours, theirs in truth.values()), truth


def test_threads_option_sets_the_thread_count_of_the_run(tmp_path, calib):
    """--threads: the run computes with that many CPU threads (recorded in the report's environment), through the
    API and the command line; a count below 1 is refused."""
    src = tiny.build(tmp_path / "in", "llama")
    before = torch.get_num_threads()
    try:
        report = streamprune.prune(src, tmp_path / "api", calib=calib, nsamples=4, seqlen=64, threads=1)
        assert report.args["threads"] == 1 and report.environment["threads"] == 1
        result = CliRunner().invoke(app, ["run", str(src), str(tmp_path / "cli"), "--calib", str(calib), "--nsamples",
                                          "4", "--seqlen", "64", "--threads", "2"])
        assert result.exit_code == 0, result.output
        saved = json.loads((tmp_path / "cli" / "streamprune_report.json").read_text())
        assert saved["args"]["threads"] == 2 and saved["environment"]["threads"] == 2
        with pytest.raises(streamprune.StreamPruneError, match="threads 0 must be at least 1"):
            streamprune.prune(src, tmp_path / "zero", calib=calib, threads=0)
    finally:
        torch.set_num_threads(before)
