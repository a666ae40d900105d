"""Removing routed experts (--prune-experts): the criteria re-derived from transformers' own router and expert
modules, the output as transformers loads it, bit-for-bit copies, resume, and the refusals."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import streamprune
from streamprune.calib import calib_windows
from streamprune.cli import app
from streamprune.errors import StreamPruneError
from streamprune.evaluate import evaluate, logits
from streamprune.plan import plan
from streamprune.report import load_report
from tests import tiny, tolerance
from tests.test_resume import ROOT, checkpoint_files, fail_writes_after, kill_and_resume

VARIANTS = ["mixtral", "qwen2-moe", "qwen3-moe", "glm4-moe", "minimax-m2", "deepseek-v3", "qwen3-next",
            "qwen3.5-moe-fused", "qwen3.5-moe-image", "gpt-oss", "hy-v3", "ernie4.5-moe", "glm4.7-flash"]
ARGS = dict(nsamples=8, seqlen=32, seed=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return {v: tiny.build(root / v, v) for v in [*VARIANTS, "kimi-k2.5"]}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def hf64(path: Path):
    return tiny.hf_model(path).double()


def moe_inputs(model, windows: torch.Tensor, bid: int) -> torch.Tensor:
    """The input of block `bid`'s MoE module, (tokens, D), over every window."""
    seen = []
    hook = model.model.layers[bid].mlp.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        model(windows)
    hook.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


def reference_scores(moe, m: torch.Tensor, criterion: str) -> tuple[list[float], list[int]]:
    """Each expert's score and routed tokens from transformers' router (`moe.gate`: its weights after the family's
    top-k renormalization) and experts (`moe.experts`), in float64."""
    _, weights, chosen = router(moe, m)
    experts = moe.experts
    scores, tokens = [], []
    with torch.no_grad():
        for j in range(experts.num_experts):
            token, slot = torch.where(chosen == j)
            norms = torch.linalg.vector_norm(expert_output(experts, j, m[token]), dim=-1)
            g = weights[token, slot].double()
            n = int(token.numel())
            tokens.append(n)
            scores.append({"reap": float((g * norms).sum()) / n if n else 0.0, "ean": float(norms.sum()),
                           "frequency": float(n)}[criterion])
    return scores, tokens


def router(moe, m: torch.Tensor):
    """transformers' router of an MoE module on `m`: (logits, weights, chosen); MiniMax-M2's takes its block's bias,
    gpt-oss's is `router`."""
    if hasattr(moe, "router"):
        return moe.router(m)
    bias = getattr(moe, "e_score_correction_bias", None)
    return moe.gate(m) if bias is None else moe.gate(m, bias)


def expert_output(experts, j: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `j` of transformers' fused experts module on its tokens `x`: gpt-oss's x @ W + b with gate and up
    interleaved and its clamped SwiGLU, or the others' gated MLP."""
    F = torch.nn.functional
    if hasattr(experts, "gate_up_proj_bias"):
        hidden = experts._apply_gate(x @ experts.gate_up_proj[j] + experts.gate_up_proj_bias[j])
        return hidden @ experts.down_proj[j] + experts.down_proj_bias[j]
    gate, up = F.linear(x, experts.gate_up_proj[j]).chunk(2, dim=-1)
    return F.linear(experts.act_fn(gate) * up, experts.down_proj[j])


def lowest(scores: list[float], removed: int, groups: int = 1) -> list[int]:
    """The experts to remove: the lowest-scoring (the later of equal ones), the same number from each group."""
    size = len(scores) // groups
    return sorted(x for g in range(groups) for x in sorted(range(g * size, (g + 1) * size),
                                                           key=lambda x: (scores[x], -x))[:removed // groups])


@pytest.mark.parametrize("sequential", [True, False], ids=["sequential", "not-sequential"])
@pytest.mark.parametrize("criterion", ["reap", "ean", "frequency"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_criteria_match_transformers(tmp_path, models, calib, variant, criterion, sequential):
    """Every MoE block's scores and removed experts, re-derived in float64 from transformers' modules on the block's
    MoE input as the run sees it: the earlier blocks as written (pruned, experts removed), then this block's
    attention pruned (--sequential) or dense."""
    src, out = models[variant], tmp_path / "out"
    report = streamprune.prune(src, out, calib=calib, sparsity=0.5, sequential=sequential, prune_experts=0.5,
                               expert_criterion=criterion, **ARGS)
    windows = calib_windows(calib, src, tiny.VOCAB, ARGS["seqlen"], ARGS["nsamples"], ARGS["seed"])
    written, dense = hf64(out), hf64(src)
    assert report.experts, "no MoE block reported"
    for block in report.experts:
        bid = block["block"]
        if not sequential:  # this block's dense attention (or linear attention) on the written blocks' output
            mixed = hf64(out)
            layer, dense_layer = mixed.model.layers[bid], dense.model.layers[bid]
            mixer = "linear_attn" if hasattr(layer, "linear_attn") else "self_attn"
            getattr(layer, mixer).load_state_dict(getattr(dense_layer, mixer).state_dict())
            m = moe_inputs(mixed, windows, bid)
        else:
            m = moe_inputs(written, windows, bid)
        scores, tokens = reference_scores(dense.model.layers[bid].mlp, m, criterion)
        n = len(scores)
        assert block["criterion"] == criterion and block["kept"] == n - math.floor(0.5 * n)
        assert block["removed"] == lowest(scores, n - block["kept"], getattr(dense.config, "n_group", 1))
        got = [e["score"] for e in block["experts"]]
        assert got == pytest.approx(scores, rel=1e-5, abs=1e-12)
        assert [e["routed_tokens"] for e in block["experts"]] == tokens
        kept = [e["expert"] for e in block["experts"] if e["kept"]]
        assert [e["index"] for e in block["experts"] if e["kept"]] == list(range(len(kept)))
        # the kept experts are calibrated on the tokens the reduced router (the written one) sends them
        _, _, chosen = router(written.model.layers[bid].mlp, m)
        routed = {lr.expert: lr.routed_tokens for lr in report.layers if lr.block == bid and lr.expert is not None}
        assert routed == {k: int((chosen == k).sum()) for k in range(len(kept))}


@pytest.mark.parametrize("variant", [*VARIANTS, "kimi-k2.5"])
def test_removal_alone_copies_every_kept_tensor(tmp_path, models, calib, variant):
    """--sparsity 0: the kept experts (renumbered in order; stored fused: their slices, in order), the router's kept
    rows and every other tensor bit for bit; the config's expert count updated (an image-text model's in its
    text_config); transformers loads it with no flag and its logits and perplexity equal streamprune's."""
    src, out = models[variant], tmp_path / "out"
    report = streamprune.prune(src, out, calib=calib, sparsity=0.0, prune_experts=0.5, **ARGS)
    assert report.layers == []  # nothing solved
    before, after = tensors(src), tensors(out)
    expected = {}
    router = {}
    for name, t in before.items():
        if ".experts." in name:
            continue
        if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "mlp.router.weight", "mlp.router.bias",
                          "mlp.router.gate.weight")):
            router[name] = t
        elif name.endswith(("e_score_correction_bias", "mlp.expert_bias")):  # along its last axis: (n) or (1, n)
            router[name] = t.T if t.dim() == 2 else t
        else:
            expected[name] = t
    for block in report.experts:
        bid = block["block"]
        keep = [e["expert"] for e in block["experts"] if e["kept"]]
        for name, t in before.items():
            prefix = f"layers.{bid}."
            if prefix in name and ".experts." in name:
                head, rest = name.split(".experts.")
                if "." not in rest:  # every expert's, fused (weights, biases): the kept slices
                    expected[name] = t[keep]
                    continue
                xid, tail = rest.split(".", 1)
                if int(xid) in keep:
                    expected[f"{head}.experts.{keep.index(int(xid))}.{tail}"] = t
            if prefix in name and name in router:
                expected[name] = router[name][keep] if router[name].shape == before[name].shape else router[name][keep].T
    assert sorted(after) == sorted(expected)
    for name in expected:
        assert torch.equal(after[name], expected[name]), name
    n_in = json.loads((src / "config.json").read_text())
    n_out = json.loads((out / "config.json").read_text())
    if "text_config" in n_in:
        assert {k: v for k, v in n_out.items() if k != "text_config"} == \
            {k: v for k, v in n_in.items() if k != "text_config"}
        n_in, n_out = n_in["text_config"], n_out["text_config"]
    key = next(k for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts") if k in n_in)
    assert n_out[key] == n_in[key] - math.floor(0.5 * n_in[key])
    top = "moe_k" if "moe_k" in n_in else "num_experts_per_tok"  # ERNIE 4.5's name
    assert n_out[top] == n_in[top]
    ids = torch.randint(0, tiny.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = tiny.hf_model(out)(ids).logits
    torch.testing.assert_close(logits(out, ids), theirs, rtol=0, atol=1e-4)
    ours = evaluate(out, calib, seqlen=32, nsamples=4)
    windows = calib_eval_windows(out, calib)
    with torch.no_grad():
        nll = tiny.hf_model(out)(windows, labels=windows).loss
    ref = math.exp(float(nll))  # transformers' float32 mean over the 4 x 31 predicted tokens
    assert ours.perplexity == pytest.approx(ref, rel=tolerance.perplexity(4 * 31, ref))


def calib_eval_windows(model: Path, data: Path) -> torch.Tensor:
    from streamprune.calib import eval_windows, load_tokens

    return eval_windows(load_tokens(data, model, tiny.VOCAB), 32, 4)


def test_run_eval_is_the_reduced_model(tmp_path, models, calib):
    """--eval in the run that removes experts and prunes the kept ones equals `eval` of what it wrote."""
    src, out = models["qwen2-moe"], tmp_path / "out"
    report = streamprune.prune(src, out, calib=calib, sparsity=0.5, prune_experts=0.34, eval=calib, eval_nsamples=4,
                               eval_seqlen=32, **ARGS)
    assert report.perplexity == pytest.approx(evaluate(out, calib, seqlen=32, nsamples=4).perplexity, rel=1e-6)
    assert all(b["kept"] == 4 for b in report.experts)  # 6 - floor(0.34 x 6)


def test_kept_count_rounds_to_the_multiple(tmp_path, models, calib):
    out = tmp_path / "out"
    report = streamprune.prune(models["qwen2-moe"], out, calib=calib, sparsity=0.0, prune_experts=0.2,
                               experts_multiple=4, **ARGS)
    assert {b["kept"] for b in report.experts} == {4}  # 6 - floor(1.2) = 5, down to a multiple of 4
    assert json.loads((out / "config.json").read_text())["num_experts"] == 4


def test_random_criterion_needs_no_calibration(tmp_path, models):
    out = tmp_path / "out"
    report = streamprune.prune(models["mixtral"], out, sparsity=0.0, prune_experts=0.5, expert_criterion="random",
                               nsamples=8, seqlen=32)
    again = streamprune.prune(models["mixtral"], tmp_path / "again", sparsity=0.0, prune_experts=0.5,
                              expert_criterion="random", nsamples=8, seqlen=32)
    assert [b["removed"] for b in report.experts] == [b["removed"] for b in again.experts]
    assert all(e["routed_tokens"] is None for b in report.experts for e in b["experts"])


@pytest.mark.parametrize("fail_after", [2, 3])  # shards: the globals, then one per block
def test_interrupted_run_resumes_byte_identical(tmp_path, monkeypatch, models, calib, fail_after):
    """A run stopped after its first blocks resumes (its streams replayed through the reduced shards it wrote) to the
    same bytes, the same report of experts and the same perplexity as an uninterrupted one."""
    src = models["qwen2-moe"]
    args = dict(calib=calib, sparsity=0.5, prune_experts=0.5, eval=calib, eval_nsamples=4, eval_seqlen=32, **ARGS)
    ref = streamprune.prune(src, tmp_path / "ref", **args)
    with monkeypatch.context() as patch:
        fail_writes_after(patch, fail_after)
        with pytest.raises(StreamPruneError):
            streamprune.prune(src, tmp_path / "out", **args)
    resumed = streamprune.prune(src, tmp_path / "out", **args)
    assert resumed.resumed_at_block is not None and resumed.resumed_at_block > 0
    assert checkpoint_files(tmp_path / "out") == checkpoint_files(tmp_path / "ref")
    assert resumed.experts == ref.experts
    assert resumed.perplexity == ref.perplexity
    assert load_report(tmp_path / "out").experts == ref.experts


def test_sigkill_at_random_points_then_resume(tmp_path):
    """Kill a run that removes experts and prunes the kept ones at random moments, resume each time: the same bytes
    as an uninterrupted run."""
    model, calib = tiny.deep(tmp_path, "MixtralConfig", hidden_size=128, intermediate_size=128, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)
    cmd = [sys.executable, str(ROOT / "cli.py"), "run", str(model), "OUT", "--calib", str(calib), "--nsamples", "32",
           "--seqlen", "128", "--device", "cpu", "--batch", "4", "--prune-experts", "0.5", "--no-sequential"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run([str(ref) if c == "OUT" else c for c in cmd], check=True, capture_output=True, cwd=ROOT)
    kill_and_resume([str(out) if c == "OUT" else c for c in cmd], out, ref, load_report(ref).wall_seconds)
    assert load_report(out).experts == load_report(ref).experts


@pytest.mark.parametrize("args, message", [
    (["--prune-experts", "0.5", "--sparsity", "0"], "model_type 'llama' has no routed experts"),
    (["--prune-experts", "0.75", "--sparsity", "0", "--calib", "CALIB"],
     "--prune-experts 0.75 keeps 1 of 4 experts per block (4 - floor(0.75 x 4) = 1), fewer than the 2 each token is "
     "routed to (num_experts_per_tok)"),
    (["--prune-experts", "0.5", "--sparsity", "0"],
     "--expert-criterion 'reap' needs calibration data: pass --calib FILE"),
    (["--prune-experts", "1.5", "--sparsity", "0", "--calib", "CALIB"], "must be a fraction in [0, 1)"),
    (["--prune-experts", "0.75", "--sparsity", "0", "--calib", "CALIB"],
     "--prune-experts 0.75 leaves 1 of 4 experts in each of the 4 groups of the router (n_group), which scores a group "
     "by its two best experts: keep at least 2 per group"),
    (["--prune-experts", "0.7", "--sparsity", "0", "--calib", "CALIB", "--experts-multiple", "16"],
     "--prune-experts 0.7 keeps 0 of 16 experts per block (4 - floor(0.7 x 4) in each of 4 groups, rounded down to a "
     "multiple of 16, 0 of them in the 2 groups a token chooses from)"),
], ids=["dense-model", "fewer-than-top-k", "no-calib", "fraction", "group-of-one", "groups-multiple"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, models, calib, args, message):
    src = (tiny.build(tmp_path / "llama", "llama") if "routed experts" in message
           else models["deepseek-v3"] if "group" in message else models["mixtral"])
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(src), str(out), *[str(calib) if a == "CALIB" else a for a in args]])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def test_plan_counts_the_survey_and_the_output(models):
    plain = plan(models["mixtral"], nsamples=8, seqlen=32)
    removing = plan(models["mixtral"], nsamples=8, seqlen=32, prune_experts=0.5)
    experts = sum(p.stat().st_size for p in models["mixtral"].glob("*.safetensors"))  # an upper bound
    assert plain.read_bytes == plain.output_bytes < experts
    expert_bytes = removing.read_bytes - plain.read_bytes
    assert expert_bytes > 0
    assert removing.output_bytes < plain.output_bytes
    assert plain.output_bytes - removing.output_bytes >= expert_bytes // 2  # half the experts and router rows


def test_scores_reused_from_a_report(tmp_path, models, calib, monkeypatch):
    """--prune-experts 0 scores every expert and removes none (its output is the input); --expert-scores REPORT then
    removes each block's lowest-scoring experts of that report, drawing no calibration window, and says so."""
    src = models["qwen2-moe"]
    scored = streamprune.prune(src, tmp_path / "scored", calib=calib, sparsity=0.0, prune_experts=0.0, **ARGS)
    assert all(b["kept"] == 6 and b["removed"] == [] for b in scored.experts)
    assert tensors(tmp_path / "scored").keys() == tensors(src).keys()
    assert all(torch.equal(t, tensors(src)[k]) for k, t in tensors(tmp_path / "scored").items())

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration data read")

    monkeypatch.setattr("streamprune.calib.calib_windows", no_calibration)
    path = tmp_path / "scored" / "streamprune_report.json"
    report = streamprune.prune(src, tmp_path / "out", sparsity=0.0, prune_experts=0.5, expert_scores=path,
                               calib=calib, **ARGS)  # the calibration file is not used: nothing needs it
    for block, given in zip(report.experts, scored.experts):
        scores = [e["score"] for e in given["experts"]]
        assert block["removed"] == lowest(scores, 3) and [e["score"] for e in block["experts"]] == scores
        assert block["criterion"] == "reap" and block["scores_from"] == str(path)
    assert report.expert_scores == {"file": str(path), "criterion": "reap",
                                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 3


def test_plan_reads_the_experts_once_with_known_scores(models, tmp_path, calib):
    surveyed = plan(models["mixtral"], nsamples=8, seqlen=32, prune_experts=0.5)
    known = plan(models["mixtral"], nsamples=8, seqlen=32, prune_experts=0.5, expert_criterion="random")
    plain = plan(models["mixtral"], nsamples=8, seqlen=32)
    assert known.read_bytes == plain.read_bytes < surveyed.read_bytes


@pytest.mark.parametrize("case", ["other-count", "other-model", "no-fraction", "no-scores"])
def test_bad_expert_scores_are_one_line_and_write_nothing(tmp_path, models, calib, case):
    mixtral = models["mixtral"]
    other = tmp_path / "other"
    if case == "other-model":  # the same expert count, another config
        shutil.copytree(mixtral, other)
        cfg = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-3}))
        scorer = other
    else:
        scorer = models["qwen3-moe"]  # 5 experts per block, the mixtral 4
    scores = tmp_path / "scores"
    streamprune.prune(scorer, scores, calib=calib, sparsity=0.0, prune_experts=0.0, **ARGS)
    path = scores / "streamprune_report.json"
    if case == "no-scores":
        streamprune.prune(mixtral, tmp_path / "plain", calib=calib, **ARGS)
        path = tmp_path / "plain" / "streamprune_report.json"
    args = ["--expert-scores", str(path), "--sparsity", "0"] + ([] if case == "no-fraction" else
                                                              ["--prune-experts", "0.5"])
    message = {"other-count": f"--expert-scores {str(path)!r}: block 0 has 5 experts' scores; the model has 4 routed "
                              "experts there",
               "other-model": f"--expert-scores {str(path)!r}: the scores of another model (its fingerprint's model "
                              f"differs from {str(mixtral)!r})",
               "no-fraction": f"--expert-scores {str(path)!r} needs --prune-experts F",
               "no-scores": f"--expert-scores {str(path)!r}: holds no expert scores"}[case]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(mixtral), str(out), *args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def reference_fit(moe, m: torch.Tensor, keep: list[int], damp: float = 0.01) -> list[torch.Tensor]:
    """The kept experts' down projections fitted as --compensate-experts defines it, in float64 from transformers'
    router and experts on the block's MoE input `m`: the reduced router's routes; in order, each expert's rows
    weighted by g^2, the target of a token whose last expert it is the dense routed output less the experts before
    it (fitted) over g, else its own output; ridge `damp` x the mean diagonal."""
    _, weights, chosen = router(moe, m)
    dense = torch.zeros_like(m)
    for j in range(moe.experts.num_experts):
        token, slot = torch.where(chosen == j)
        dense.index_add_(0, token, expert_output(moe.experts, j, m[token]) * weights[token, slot, None])
    logits = torch.nn.functional.linear(m, moe.gate.weight[keep])
    probs = torch.softmax(logits, dim=-1)
    w, new = torch.topk(probs, moe.gate.top_k, dim=-1)
    if getattr(moe.gate, "norm_topk_prob", True):
        w = w / w.sum(dim=-1, keepdim=True)
    acc, fitted = torch.zeros_like(m), []
    F = torch.nn.functional
    for k, x in enumerate(keep):
        token, slot = torch.where(new == k)
        g = w[token, slot, None]
        gate, up = F.linear(m[token], moe.experts.gate_up_proj[x]).chunk(2, dim=-1)
        h = moe.experts.act_fn(gate) * up
        own = F.linear(h, moe.experts.down_proj[x])
        last = (new[token].max(dim=-1).values == k)[:, None]
        target = torch.where(last, (dense[token] - acc[token]) / g, own)
        H, C = (h * g**2).T @ h, (target * g**2).T @ h
        H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
        fitted.append(torch.linalg.solve(H, C.T).T)
        acc.index_add_(0, token, F.linear(h, fitted[-1]) * g)
    return fitted


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe"])
def test_compensation_fits_the_dense_block(tmp_path, models, calib, variant):
    """--compensate-experts: plain removal's names, shapes and config, every tensor but the kept experts' down
    projections as plain removal writes it; block 0's fitted down projections equal the float64 reference fit from
    transformers' modules; transformers' logits of the output equal streamprune's."""
    src = models[variant]
    plain = streamprune.prune(src, tmp_path / "plain", calib=calib, sparsity=0.0, prune_experts=0.5, **ARGS)
    fitted = streamprune.prune(src, tmp_path / "fitted", calib=calib, sparsity=0.0, prune_experts=0.5,
                               compensate_experts=True, **ARGS)
    assert fitted.experts[0] == plain.experts[0]  # the same first choice (later blocks see compensated ones)
    a, b = tensors(tmp_path / "plain"), tensors(tmp_path / "fitted")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    same = {p["block"] for p, f in zip(plain.experts, fitted.experts) if p == f}  # blocks that chose alike
    down = ("down_proj.weight", "w2.weight")
    assert any(f"layers.{plain.experts[0]['block']}." in k for k in changed)
    assert all(".experts." in k and k.endswith(down) for k in changed if int(k.split(".")[2]) in same), changed
    assert (json.loads((tmp_path / "plain" / "config.json").read_text())
            == json.loads((tmp_path / "fitted" / "config.json").read_text()))
    windows = calib_windows(calib, src, tiny.VOCAB, ARGS["seqlen"], ARGS["nsamples"], ARGS["seed"])
    dense, written = hf64(src), hf64(tmp_path / "fitted")
    bid = plain.experts[0]["block"]
    keep = [e["expert"] for e in plain.experts[0]["experts"] if e["kept"]]
    reference = reference_fit(dense.model.layers[bid].mlp, moe_inputs(dense, windows, bid), keep)
    got = written.model.layers[bid].mlp.experts.down_proj
    for k, ref in enumerate(reference):
        torch.testing.assert_close(got[k], ref.float().double(), rtol=1e-4, atol=1e-5)
    ids = torch.randint(0, tiny.VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = tiny.hf_model(tmp_path / "fitted")(ids).logits
    torch.testing.assert_close(logits(tmp_path / "fitted", ids), theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--compensate-experts", "--sparsity", "0", "--calib", "CALIB"],
     "--compensate-experts needs --prune-experts F"),
    (["--compensate-experts", "--prune-experts", "0.5", "--no-sequential", "--calib", "CALIB"],
     "--compensate-experts fits the kept experts to the block as pruned so far: it needs --sequential"),
    (["--compensate-experts", "--prune-experts", "0.5", "--sparsity", "0", "--expert-criterion", "random"],
     "--compensate-experts needs calibration data: pass --calib FILE"),
], ids=["no-removal", "not-sequential", "no-calib"])
def test_bad_compensation_is_one_line_and_writes_nothing(tmp_path, models, calib, args, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(models["mixtral"]), str(out),
                                      *[str(calib) if a == "CALIB" else a for a in args]])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert not out.exists()


def calibration_record(src: Path, calib: Path, windows: torch.Tensor, monkeypatch) -> dict:
    """Per MoE block, what scoring every expert (--prune-experts 0) computed from `windows` (N, T), by position:
    the MoE input (what the experts' statistics are made of), each token's routes and weights, and each expert's
    per-token share of its score (g x ||f||)."""
    from streamprune import job
    from streamprune.arch import Role
    from streamprune.arch.block import expert_hidden, linear
    from streamprune.forward import routed_rows
    from streamprune.lane import PruneLane

    record, survey = {}, PruneLane.survey
    N, T = windows.shape

    def recording(self, part):
        survey(self, part)
        bid, stats = part.bid, self.stats
        if part.xid == 0:
            record[bid, "input"] = stats.read(0, N, self.device)
            record[bid, "chosen"] = torch.cat([c for _, _, c, _ in self.routes]).view(N, T, -1)
            record[bid, "weights"] = torch.cat([w for _, _, _, w in self.routes]).view(N, T, -1)
        share = torch.zeros(N * T, dtype=torch.float64)
        for i, j, token, g in routed_rows(self.routes, part.xid):
            f = linear(part.w, Role.FFN_DOWN_EXP, expert_hidden(self.ckpt.config, part.w, stats.rows(i, j, token,
                                                                                                      self.device)))
            share[i * T + token] = g.double() * torch.linalg.vector_norm(f.double(), dim=-1)
        record[bid, "score", part.xid] = share.view(N, T)

    with monkeypatch.context() as patch:
        patch.setattr(PruneLane, "survey", recording)
        patch.setattr(job, "draw_windows", lambda ckpt, sources, seed, seqlen: windows)
        out = Path(str(src) + "-scored")
        streamprune.prune(src, out, calib=calib, sparsity=0.0, prune_experts=0.0, nsamples=N, seqlen=T, overwrite=True)
        shutil.rmtree(out)
    return record


def earlier_positions_differ(src: Path, calib: Path, monkeypatch, cut: int = 10) -> list:
    """The records whose positions before `cut` change when every token from `cut` on is changed: routes at all,
    the rest by more than float32 rounding (kernels whose sums are split by the length of what they see round the
    earlier positions' values differently in the last bits, 1e-7 relative here; a future token seen moves them by
    far more)."""
    windows = torch.randint(0, tiny.VOCAB, (3, 16), generator=torch.Generator().manual_seed(0))
    later = windows.clone()
    later[:, cut:] = (later[:, cut:] + 1 + torch.arange(16 - cut)) % tiny.VOCAB
    a, b = (calibration_record(src, calib, w, monkeypatch) for w in (windows, later))
    assert a.keys() == b.keys() and any(key[1] == "score" for key in a)
    def same(x: torch.Tensor, y: torch.Tensor) -> bool:
        if not x.is_floating_point():
            return torch.equal(x, y)
        return torch.allclose(x, y, rtol=1e-5, atol=1e-5 * float(x.abs().max()))

    return [key for key in a if not same(a[key][:, :cut], b[key][:, :cut])]


def no_attention_mask(q, k, v, *args, **kwargs):
    """Attention over every position of the window, the future included (the mask dropped on purpose)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != q.shape[1])


@pytest.mark.parametrize("variant", [*VARIANTS, "kimi-k2.5", "llama4"])  # every MoE family
def test_calibration_is_causal(tmp_path, models, calib, monkeypatch, variant):
    """Changing later tokens of a calibration window changes no earlier position's MoE input, routes, routing
    weights or share of any expert's score, in any MoE block; with the attention mask dropped on purpose, the same
    check finds earlier positions that change."""
    from streamprune.arch import block

    src = Path(shutil.copytree(models[variant], tmp_path / "model")) if variant in models else \
        tiny.build(tmp_path / "model", variant)
    assert earlier_positions_differ(src, calib, monkeypatch) == []
    monkeypatch.setattr(block, "fused_attention", no_attention_mask)
    monkeypatch.setattr(block, "explicit_attention", no_attention_mask)
    assert earlier_positions_differ(src, calib, monkeypatch) != []
