"""One pruning point as a consumer of the block loop: a block's linears pruned site by site, its routed experts one
at a time as they arrive, every pruned tensor written as soon as it is final.

    enter(block)    the block's other tensors written; its linears pruned in the order of SEQUENTIAL, each site's
                    statistics from a forward of the calibration windows through the block as pruned so far; its
                    evaluation streams enter the pruned block; a dense block's output computed for the next block
    expert(part)    one routed expert pruned (EXPERT_SEQUENTIAL) from the tokens routed to it, its weighted output
                    added to the block's output and to the evaluation streams
    leave(block)    the block's shard put in place; the block's output becomes the next block's input

Removing routed experts (--prune-experts), an MoE block surveys its experts before the pass above hands them over:
`survey` scores each dense expert from the tokens the full router sends it, `surveyed` keeps the best ones, cuts the
router to them and routes the tokens again, so that the kept experts are calibrated on the routing of the reduced
router and the block's output (and its evaluation streams) is the reduced block's. A removed expert is not written.

An MoE block runs in passes so that its experts are read once (see `forward.forward_block`). With --sequential,
the first pass of the pruned block writes its output without the routed experts (or, where the experts' sum enters
the output through norms, zeros for that sum, completed by a third pass at the end) and keeps its MoE input, from
which each expert's statistics come. Without it, the statistics come from the dense block (its MoE input kept by the
calibration forward) and the pruned block runs forward at the end, its experts read back from the shard.

With several ranks, each runs the forwards on its share of the windows, the statistics are summed across ranks before
a site is solved (`merge`), each linear is solved by one rank and its stored tensors broadcast from there (`share`);
with one process these steps do nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from streamprune.activations import Activations, DiskActivations, copy_store, make_store
from streamprune.arch import EXPERT_SEQUENTIAL, SEQUENTIAL, Param, Role, Site
from streamprune.arch.block import expert_hidden, expert_input
from streamprune.arch.roles import ROUTER_ROLES, expert_axis
from streamprune.errors import DataError, StreamPruneError
from streamprune.hidden import HiddenStream
from streamprune.experts import Tally, choose, compensated_down, decision, tally
from streamprune.forward import Routes, add_expert, finish_block, forward_block, route_all, routed_rows
from streamprune.loop import Consumer, Status
from streamprune.owl import Allocation, block_linears, linear_zeros
from streamprune.pruners import Pruner, make_pruner
from streamprune.report import LayerReport, Report
from streamprune.stream import BlockStream, Part
from streamprune.tensorfile import all_finite
from streamprune.writer import BlockShard, Sink, block_meta

if TYPE_CHECKING:
    from streamprune.job import Job


class PruneLane(Consumer):
    """One point's pruning (`job`), its figures in `report`, its shards into `sink`; `calib` holds its calibration
    activations (None: the method reads no statistics), `streams` the evaluation streams of the pruned model.
    `copy`: prune copies of the blocks' weights, leaving them as read for the consumers after this one (a sweep's
    other points); else they are pruned in place and their host copies released as soon as they are written."""

    def __init__(self, job: Job, report: Report, sink: Sink, calib: HiddenStream | None, streams: list[HiddenStream],
                 status: Status, allocation: Allocation | None = None, copy: bool = False) -> None:
        self.job, self.report, self.sink, self.calib, self.streams, self.status = job, report, sink, calib, streams, status
        self.ckpt, self.opts, self.device, self.ranks, self.copy = job.ckpt, job.opts, job.device, job.ranks, copy
        self.turn = 0  # rotates the ranks that solve single-linear sites
        n = self.ckpt.config.n_layers
        self.block_sparsity = [job.sparsity] * n if allocation is None else allocation.block_sparsity
        # each linear's exact count of removed weights when the blocks have their own sparsities (none when uniform:
        # the method's own rounding of the one sparsity)
        self.zeros: dict[str, int] = {} if allocation is None else linear_zeros(
            [(name, math.prod(self.ckpt.tensors[name].shape), allocation.block_sparsity[b])
             for b in range(n) for _, name in block_linears(self.ckpt, b).values()])
        # the block being pruned: its weights, output shard, first report row, routes and the experts' statistics
        self.w: dict[Param, Tensor] = {}
        self.shard: BlockShard | None = None
        self.first_row = 0
        self.routes: Routes | None = None
        self.stats: Activations | None = None
        # removing routed experts: each MoE block keeps `kept` experts (else None); the block's router tensors as read,
        # the experts' sums (survey) and the ones kept, in order
        self.removal = job.removal
        self.kept = None if job.removal is None else job.removal.kept
        self.router: dict[str, tuple[Tensor, int]] = {}  # name -> (tensor, the axis of its experts)
        self.tallies: list[Tally] = []
        self.keep: list[int] = []
        self.decision: dict[str, Any] | None = None
        self.disk_seen: tuple[int, int] | None = None  # the activation files' bytes read and written so far
        # --compensate-experts: the dense block's output over the calibration windows, which the kept experts fit
        self.dense: Activations | None = None
        if self.removal is not None and self.removal.compensate and calib is not None:
            self.dense = make_store(tuple(calib.x.shape), job.placement, job.device, job.work, f"dense{id(self)}")
        # without weight solves the block is exact as read, so the pruned block's own first pass gives its experts'
        # statistics whatever --sequential says
        self.sequential = self.opts.sequential or not job.solves

    def enter(self, block: Part) -> None:
        bid, calib = block.bid, self.calib
        moe = self.ckpt.n_experts(bid) > 0
        removes = moe and self.kept is not None
        self.w = dict(block.w) if self.copy else block.w  # the pruners replace the entries they prune
        self.first_row = len(self.report.layers)
        with self.report.timed("write", bid):
            # the shard has the output's names, dtypes and shapes: its header is written first, and each tensor as
            # soon as it is final (the pruned ones as they are solved, the router once the kept experts are known,
            # the others now)
            self.shard = self.sink.open(bid + 1, block_meta(self.job.out, bid, self.job.layout),
                                        read_back=moe and calib is not None and not self.sequential,
                                        layout=self.job.layout)
            pruned = set(self.ckpt.pruned_linears(bid).values()) if self.job.solves else set()
            router = {self.ckpt.names[((role, kind), bid)]: expert_axis(role) for ((role, kind), b) in self.ckpt.names
                      if b == bid and role in ROUTER_ROLES} if removes else {}
            self.router = {name: (block.raw[name], axis) for name, axis in router.items()}
            self.put_as_read({n: n for n in self.ckpt.block_names(bid) if n not in pruned and n not in router},
                             block.raw)
            if not self.copy:
                block.raw.clear()  # written or held by `w` (on the CPU the same tensors; on a GPU, their copies)
        self.status.phase(f"block {bid}: prune")
        m_store = calib.scratch if calib and moe and not self.sequential else None
        self.routes = self.prune_sites(bid, m_store) if self.job.solves else None
        if not removes:  # else once the router is cut (`surveyed`)
            self.enter_streams(block)
        if moe:
            self.status.phase(f"block {bid}: experts")
            self.start_experts(bid)
        elif calib is not None:
            self.status.phase(f"block {bid}: forward")
            with self.report.timed("forward", bid):
                forward_block(self.ckpt, self.w, calib.x, calib.pos.of(bid), calib.scratch, self.job.batch, self.device,
                              carry=calib.carry(bid))
        if removes and not self.surveys(block):  # the scores are known: the experts are read once
            self.reduce(block)
        elif not removes:
            self.release_block(moe)

    def enter_streams(self, block: Part) -> None:
        for stream in self.streams:
            with self.report.timed("eval", block.bid):
                stream.enter(dataclasses.replace(block, w=self.w))

    def release_block(self, moe: bool) -> None:
        if not (moe and self.calib is not None and (not self.sequential or self.ckpt.config.moe_beside_mlp)):
            self.w = {}  # only the forward of a block read back, or its third pass, needs them: a sweep's points hold
            # one at a time

    def surveys(self, block: Part) -> bool:
        return self.removal is not None and self.removal.surveys and self.ckpt.n_experts(block.bid) > 0

    def survey(self, part: Part) -> None:
        """Expert `part` as read: its sums over the tokens the full router sends it (with --compensate-experts, its
        weighted output added to the dense block's)."""
        if not self.surveys(part):
            return
        assert self.routes is not None and self.stats is not None and part.xid is not None
        with self.report.timed("survey", part.bid):
            if part.xid == 0 and self.dense is not None:  # the block's output without its routed experts
                assert self.calib is not None
                copy_store(self.calib.scratch, self.dense, self.job.batch)
            self.tallies.append(tally(self.ckpt.config, self.w, part.w, routed_rows(self.routes, part.xid),
                                      self.stats, self.device, self.dense))

    def surveyed(self, block: Part) -> None:
        if self.surveys(block):
            self.reduce(block)

    def reduce(self, block: Part) -> None:
        """Every expert scored (surveyed, or known up front): the best `kept` chosen, the router cut to them (written
        bit for bit, row by row), and the tokens routed again by the reduced router."""
        bid, n, removal = block.bid, self.ckpt.n_experts(block.bid), self.removal
        assert removal is not None and self.kept is not None and self.shard is not None
        with self.report.timed("survey", bid):
            tallies = None
            if removal.known:
                scores = removal.of(bid, n, self.opts.seed)
            else:
                tallies = [Tally(self.ranks.sum_int(t.tokens), self.ranks.sum_float(t.norm),
                                 self.ranks.sum_float(t.weighted_norm)) for t in self.tallies]  # every rank's share
                scores = [t.score(removal.criterion) for t in tallies]
            criterion = removal.criterion
            self.keep = choose(scores, self.kept, self.ckpt.config.n_group)
            self.decision = decision(bid, criterion, scores, tallies, self.keep,
                                     None if removal.source is None else removal.source["file"])
            for name, (tensor, axis) in self.router.items():
                self.shard.put(name, tensor.index_select(axis, torch.tensor(self.keep)).contiguous())
            rows = torch.tensor(self.keep, device=self.device)
            for param in [p for p in self.w if p[0] in ROUTER_ROLES]:
                self.w[param] = self.w[param].index_select(expert_axis(param[0]), rows)
            if self.routes is not None:
                assert self.stats is not None
                self.routes = route_all(self.ckpt, self.w, self.stats, self.job.batch, self.device)
        self.router, self.tallies = {}, []
        self.enter_streams(block)
        self.release_block(moe=True)

    def expert(self, part: Part) -> None:
        bid, xid = part.bid, part.xid
        assert xid is not None
        if self.kept is not None:  # the output's index of a kept expert; a removed one is not written
            if xid not in self.keep:
                return
            xid = self.keep.index(xid)
        we = dict(part.w) if self.copy or self.dense is not None else part.w
        if self.job.solves:
            out = self.job.out.experts[(bid, xid)]
            biases = {name: out[param] for param, name in self.ckpt.experts[(bid, part.xid)].items() if param[1] != "weight"}
            if biases:  # written as read
                with self.report.timed("write", bid):
                    self.put_as_read(biases, part.raw)
            if not self.copy:
                part.raw.clear()  # held by `we` (on the CPU the same tensors); on a GPU, its host copy goes now
            self.prune_expert(bid, xid, we)
        else:
            self.copy_expert(part, xid, we)
        for stream in self.streams:
            with self.report.timed("eval", bid):
                stream.expert(dataclasses.replace(part, w=we, xid=xid))

    def copy_expert(self, part: Part, xid: int, we: dict[Param, Tensor]) -> None:
        """Kept expert `part` written as read under index `xid` (with --compensate-experts, its down projection
        fitted first, `we` its weights then); with calibration, its weighted output added to the block's."""
        assert self.shard is not None and part.xid is not None
        bid = part.bid
        names = self.job.out.experts[(bid, xid)]
        fitted = self.compensate(bid, xid, we)
        with self.report.timed("write", bid):
            self.put_as_read({name: names[param] for param, name in self.ckpt.experts[(bid, part.xid)].items()
                              if param != fitted}, part.raw)
            if fitted is not None:
                for stored, tensor in self.job.layout.encode(names[fitted], we[fitted]).items():
                    self.shard.put(stored, tensor.cpu())
        if self.calib is not None:
            assert self.routes is not None and self.stats is not None
            with self.report.timed("forward", bid):
                add_expert(self.ckpt, self.w, we, routed_rows(self.routes, xid), self.stats, self.calib.scratch,
                           self.device)

    def compensate(self, bid: int, xid: int, we: dict[Param, Tensor]) -> Param | None:
        """--compensate-experts: kept expert `xid`'s down projection in `we` replaced by its fit to the dense block
        (`experts.compensated_down`), in its stored dtype; returns the parameter replaced (None without it)."""
        if self.dense is None:
            return None
        assert self.routes is not None and self.stats is not None and self.calib is not None
        param = (Role.FFN_DOWN_EXP, "weight")
        with self.report.timed("compensate", bid):
            fitted = compensated_down(self.ckpt.config, self.w, we, xid, self.routes, self.stats, self.dense,
                                      self.calib.scratch, self.device, self.ranks.all_reduce_sum)
            if not all_finite(fitted.to(we[param].dtype)):
                raise StreamPruneError(f"block {bid}: expert {xid}'s compensated down projection does not fit "
                                       f"{we[param].dtype}; rerun without --compensate-experts")
            we[param] = fitted.to(we[param].dtype)
        return param

    def put_as_read(self, names: dict[str, str], raw: dict[str, Tensor]) -> None:
        """Tensors written as read: `names` maps each one's input name to its output name (an expert's index may
        change), `raw` holds what was read. A linear the output stores in another format than the input (fp8 read,
        dense written, or the reverse) is decoded and encoded again."""
        assert self.shard is not None
        given, out = self.ckpt.layout, self.job.layout
        done = set()  # a fused expert's slice holds several of its linears: written once
        for src, dst in names.items():
            if (src in given.encoded) == (dst in out.encoded) and (src not in given.encoded or given.format == out.format):
                for part, stored in zip(given.stored(src), out.stored(dst)):
                    if stored not in done:
                        self.shard.put(stored, raw[part])
                        done.add(stored)
                continue
            value = given.weight(src, {part: raw[part] for part in given.stored(src)})
            for stored, tensor in (out.format.encode(dst, value) if dst in out.encoded else {dst: value}).items():
                self.shard.put(stored, tensor)

    def leave(self, block: Part) -> None:
        bid, calib = block.bid, self.calib
        if calib is not None and self.ckpt.n_experts(bid) and not self.sequential:
            with self.report.timed("forward", bid):  # the pruned block, its experts read back from its shard
                assert self.shard is not None and self.shard.path is not None
                written = BlockStream(self.job.out, self.device, range(bid, bid + 1),
                                      shard_of=lambda _, path=self.shard.path: path, layout=self.job.layout)
                forward_block(self.ckpt, self.w, calib.x, calib.pos.of(bid), calib.scratch, self.job.batch,
                              self.device, experts=lambda: written.experts(bid), carry=calib.carry(bid))
        elif calib is not None and self.ckpt.n_experts(bid):
            with self.report.timed("forward", bid):  # where the experts' sum enters the output through norms
                finish_block(self.ckpt, self.w, calib.x, calib.scratch, self.job.batch, self.device,
                             calib.carry(bid))
        if calib is not None:
            self.count_disk_io(bid)
            calib.swap()  # this block's outputs are the next block's inputs
        for stream in self.streams:
            stream.leave(block)
        self.status.phase(f"block {bid}: write")
        with self.report.timed("write", bid):
            shard, self.shard = self.shard, None
            assert shard is not None
            shard.close(self.report.layers[self.first_row:], self.decision)
        if self.decision is not None:
            self.report.experts = [*(self.report.experts or []), self.decision]
        self.w, self.routes, self.stats, self.keep, self.decision = {}, None, None, [], None

    def count_disk_io(self, bid: int) -> None:
        """With the calibration activations on disk, the bytes their files moved for block `bid`, in the report."""
        assert self.calib is not None
        files = [s for s in (self.calib.x, self.calib.scratch) if isinstance(s, DiskActivations)]
        if not files:
            return
        now = (sum(f.read_bytes for f in files), sum(f.written_bytes for f in files))
        before = self.disk_seen or (0, 0)  # the first block counts what embedding the windows wrote
        self.disk_seen = now
        blocks = (self.report.activation_io or {}).get("blocks", {})
        blocks[str(bid)] = {"read_bytes": now[0] - before[0], "written_bytes": now[1] - before[1]}
        self.report.activation_io = {**(self.report.activation_io or {}), "blocks": blocks}

    def close(self) -> None:
        """Remove the shard of a block left unfinished (by an error), and the dense block's output."""
        if self.dense is not None:
            self.dense.close()
        if self.shard is not None:
            shard, self.shard = self.shard, None
            shard.abort()

    # the linears of a block outside its routed experts
    def prune_sites(self, bid: int, m_store: Activations | None) -> Routes | None:
        """Prune every linear of block `bid` outside its routed experts, in place in `self.w`. With `m_store` (an MoE
        block without --sequential), the calibration forward also keeps the dense MoE input there and returns its
        routes, for the experts' statistics."""
        w, names = self.w, self.ckpt.pruned_linears(bid)
        groups = [(site, [r for r in roles if r in names]) for site, roles in SEQUENTIAL]
        groups = [(site, roles) for site, roles in groups if roles]
        if self.calib is None:  # magnitude without calibration data: no statistics needed
            for _, roles in groups:
                self.prune_roles(bid, w, self.new_pruner(w, roles, bid, names), roles, names)
            return None
        stages = [groups] if not self.opts.sequential else [[g] for g in groups]
        routes = None
        for stage in stages:  # sequential: one stage per site, each seeing the pruned sites before it
            pruners = {site: self.new_pruner(w, roles, bid, names) for site, roles in stage}
            routes = self.calibrate(bid, pruners, dict(stage), names, m_store)
            for site, roles in stage:
                self.prune_roles(bid, w, pruners[site], roles, names)
        return routes

    def calibrate(self, bid: int, pruners: dict[Site, Pruner], roles: dict[Site, list[Role]], names: dict[Role, str],
                  m_store: Activations | None) -> Routes | None:
        """One forward over the calibration windows, feeding each watched site's input to its pruner (and, with
        `m_store`, running an MoE block's first pass to the end: its MoE input kept there, its routes returned)."""
        assert self.calib is not None

        def tap(site: Site, a: Tensor) -> None:
            if site in pruners:
                with self.report.timed("hessian", bid):
                    pruners[site].add_batch(a)

        last = [site for site, _ in SEQUENTIAL if site in pruners][-1]  # nothing past it is needed
        with self.report.timed("calibrate", bid):
            routes = forward_block(self.ckpt, self.w, self.calib.x, self.calib.pos.of(bid), None, self.job.batch,
                                   self.device, tap=tap, until=None if m_store else last, m_store=m_store,
                                   carry=self.calib.carry(bid))
        self.merge(bid, *pruners.values())
        for site, pruner in pruners.items():
            self.check_inputs(bid, pruner, [names[r] for r in roles[site]])
        return routes

    # the routed experts, one at a time
    def start_experts(self, bid: int) -> None:
        """Before the first expert: with --sequential, the pruned block's first pass (its output without the routed
        experts, its MoE input kept over the block's input, which is no longer needed); without it, the experts'
        statistics are the dense MoE input the calibration forward kept."""
        calib = self.calib
        if calib is None:
            return
        if self.sequential:
            with self.report.timed("forward", bid):
                self.routes = forward_block(self.ckpt, self.w, calib.x, calib.pos.of(bid), calib.scratch,
                                            self.job.batch, self.device, carry=calib.carry(bid))
            self.stats = calib.x
        else:
            self.stats = calib.scratch

    def prune_expert(self, bid: int, xid: int, we: dict[Param, Tensor]) -> None:
        """Prune routed expert `xid` in place in `we`: its gate and up projections from the rows of the tokens routed
        to it (or of every token, see `expert_rows`), its down projection from their hidden activations through the
        pruned gate and up; with --sequential its weighted output is added to the block's output."""
        names = {param[0]: name for param, name in self.job.out.experts[(bid, xid)].items() if param[1] == "weight"}
        (_, in_roles), (_, down_roles) = EXPERT_SEQUENTIAL
        if self.calib is None:  # magnitude without calibration data
            for roles in (in_roles, down_roles):
                self.prune_roles(bid, we, self.new_pruner(we, roles, bid, names), roles, names, expert=xid)
            return
        stats, sequential, cfg = self.stats, self.sequential, self.ckpt.config
        assert self.routes is not None and stats is not None
        rows = routed_rows(self.routes, xid)
        rows_in, how, n_routed = self.expert_rows(rows, stats)
        row = {"expert": xid, "routed_tokens": n_routed, "statistics": how}
        p_in, p_down = (self.new_pruner(we, roles, bid, names) for _, roles in EXPERT_SEQUENTIAL)
        with self.report.timed("calibrate", bid):
            for i, j, token, weight in rows_in:
                m = self.expert_input(stats.rows(i, j, token, self.device), weight)
                with self.report.timed("hessian", bid):
                    p_in.add_batch(m)
                    if not sequential:  # the dense expert's hidden activations
                        p_down.add_batch(expert_hidden(cfg, we, m))
        self.merge(bid, p_in) if sequential else self.merge(bid, p_in, p_down)
        self.check_inputs(bid, p_in, [names[r] for r in in_roles])
        self.prune_roles(bid, we, p_in, in_roles, names, **row)
        self.compensate(bid, xid, we)  # fitted from the pruned gate and up, then pruned
        if sequential:
            with self.report.timed("hessian", bid):
                for i, j, token, weight in rows_in:
                    p_down.add_batch(expert_hidden(cfg, we, self.expert_input(stats.rows(i, j, token, self.device),
                                                                              weight)))
            self.merge(bid, p_down)
        self.check_inputs(bid, p_down, [names[r] for r in down_roles])
        self.prune_roles(bid, we, p_down, down_roles, names, **row)
        if sequential:
            assert self.calib is not None
            with self.report.timed("forward", bid):
                add_expert(self.ckpt, self.w, we, rows, stats, self.calib.scratch, self.device)

    def expert_input(self, x: Tensor, weight: Tensor) -> Tensor:
        """What enters a routed expert from token rows `x` (block.expert_input); the rows of every token come without
        weights (`expert_rows`)."""
        return expert_input(self.ckpt.config, self.w, x, weight if weight.numel() else None)

    def expert_rows(self, rows: Routes, stats: Activations) -> tuple[Routes, str, int]:
        """The token rows whose statistics an expert's solve reads: those routed to it (--moe-calibration routed)
        unless they are fewer than --moe-min-tokens, else every token that enters the MoE layer; with what was
        used and the number routed."""
        n_routed = self.ranks.sum_int(sum(int(token.numel()) for _, _, token, _ in rows))  # on every rank's share
        if self.opts.moe_calibration == "routed" and n_routed >= self.opts.moe_min_tokens:
            return rows, "routed", n_routed
        how = "all" if self.opts.moe_calibration == "all" else f"all (fewer than {self.opts.moe_min_tokens} routed)"
        T = stats.shape[1]
        every = [(i, j, torch.arange((j - i) * T), torch.ones(0)) for i, j, _, _ in rows]
        return every, how, n_routed

    # one site's solve
    def new_pruner(self, w: dict[Param, Tensor], roles: list[Role] | tuple[Role, ...], bid: int,
                   names: dict[Role, str]) -> Pruner:
        """The pruner of the linears `roles` (named `names`), which share an input."""
        columns = w[(roles[0], "weight")].shape[1]
        job = self.job
        return make_pruner(self.opts.method, columns, self.device, self.block_sparsity[bid], job.pattern,
                           job.offload_hessian, job.errors, grid=job.grid_of(names[roles[0]]), **job.knobs)

    def merge(self, bid: int, *pruners: Pruner) -> None:
        """Sum the statistics each rank added from its share of the windows (no-op with one process)."""
        if self.ranks.distributed:
            with self.report.timed("sync", bid):
                for pruner in pruners:
                    pruner.all_reduce(self.ranks)

    def check_inputs(self, bid: int, pruner: Pruner, names: list[str]) -> None:
        # a NaN or Inf in any input column shows on its diagonal entry (|x_i x_j| <= (x_i^2 + x_j^2) / 2),
        # so the d entries are checked instead of the d^2 (whose check would allocate d^2 temporaries)
        sqnorms = pruner.column_sqnorms()
        if sqnorms is not None and not bool(torch.isfinite(sqnorms).all()):
            raise DataError(f"block {bid}: calibration activations entering {', '.join(names)} contain NaN or Inf")

    def prune_roles(self, bid: int, w: dict[Param, Tensor], pruner: Pruner, roles: list[Role] | tuple[Role, ...],
                    names: dict[Role, str], **row: Any) -> None:
        """Prune the linears that share `pruner`'s input, then score each: the errors come after the solver's state
        is released, so at most one d x d matrix beside X^T X is ever needed. `row`: extra fields of their report
        rows (an expert's index and tokens). Each linear is solved and scored by its owner rank (`Ranks.owners`),
        then its stored tensors go from there to every rank (`share`)."""
        owners = self.ranks.owners([w[(role, "weight")].numel() for role in roles], self.turn)
        self.turn += 1
        done, solved_parts = [], {}
        for role in [r for r, owner in zip(roles, owners) if owner == self.ranks.rank]:
            name, dense = names[role], w[(role, "weight")]
            with self.report.timed("solve", bid) as solve:
                stored, unrounded, info = self.solve(bid, name, dense, pruner)
                solved_parts[role] = stored
                # later sites and blocks see what the output format decodes (what a loader computes)
                pruned = w[(role, "weight")] = self.job.layout.weight(name, stored)
            done.append((role, name, dense, pruned, unrounded, info, solve.seconds))
        pruner.release_solver()
        rows = {}
        for role, name, dense, pruned, unrounded, info, solved in done:
            with self.report.timed("error", bid) as scoring:
                err = pruner.reconstruction_error(dense, pruned)
                split = None if unrounded is None else pruner.split_errors(dense, unrounded, pruned)
            rows[role] = self.layer_row(bid, role, name, pruned, err, split, info, solved + scoring.seconds, row)
        pruner.free()
        self.share(bid, w, roles, owners, names, solved_parts)
        if self.ranks.distributed:
            rows = {role: r for part in self.ranks.all_gather(rows) for role, r in part.items()}
        self.report.layers += [rows[role] for role in roles]

    def solve(self, bid: int, name: str, dense: Tensor, pruner: Pruner) -> tuple[dict[str, Tensor], Tensor | None,
                                                                                  dict[str, Any]]:
        """Linear `name` pruned: its stored tensors in the output format, its weights before rounding (--wbits) and the
        solver's figures."""
        result = pruner.prune(dense, self.zeros.get(name))
        # contiguous, so that later sites and blocks multiply the same layout as a resumed run's replay
        pruned = torch.empty(result.weight.shape, dtype=self.ckpt.info(name).torch_dtype, device=self.device)
        pruned.copy_(result.weight)
        if not all_finite(pruned):  # checked as stored: a float16 cast can overflow what float32 held
            raise StreamPruneError(
                f"block {bid}: the pruned {name} does not fit {pruned.dtype} (largest |w| "
                f"{float(result.weight.abs().max()):.4g}, damping {result.info.get('damp', self.opts.damp):g}); "
                "nothing of this block was written: rerun with a larger --damp and --restart, or prune a bfloat16 or "
                "float32 copy")
        return self.job.layout.encode(name, pruned, result.quant), result.unrounded, result.info

    def layer_row(self, bid: int, role: Role, name: str, pruned: Tensor, err: float | None,
                  split: tuple[float, float] | None, info: dict[str, Any], seconds: float,
                  row: dict[str, Any]) -> LayerReport:
        grid = self.job.grid_of(name)
        return LayerReport(
            block=bid, role=role.value, name=name, shape=list(pruned.shape),
            sparsity=float((pruned == 0).sum()) / pruned.numel(), rel_error=err, seconds=seconds,
            damp=info.get("damp"), damp_retries=int(info.get("damp_retries", 0)),
            iterations=None if "iterations" not in info else int(info["iterations"]),
            cg_iterations=None if "cg_iterations" not in info else int(info["cg_iterations"]),
            cg_residual=info.get("residual"),
            sparsity_error=None if split is None else split[0], quant_error=None if split is None else split[1],
            packed_bytes=None if grid is None else grid.packed_bytes(*pruned.shape), **row)

    def share(self, bid: int, w: dict[Param, Tensor], roles: list[Role] | tuple[Role, ...], owners: list[int],
              names: dict[Role, str], solved: dict[Role, dict[str, Tensor]]) -> None:
        """Each pruned linear's stored tensors from the rank that solved it (`solved` holds this rank's) to every
        rank, which uses them from now on; each is written into the block's shard (which keeps nothing outside
        rank 0)."""
        assert self.shard is not None
        with self.report.timed("sync", bid) if self.ranks.distributed else contextlib.nullcontext():
            for role, owner in zip(roles, owners):
                name = names[role]
                stored = solved.get(role)
                if stored is None:  # another rank's: received into buffers of the stored dtypes and shapes
                    info = self.ckpt.info(name)
                    stored = {part: torch.empty(shape, dtype=dtype, device=self.device)
                              for part, (dtype, shape) in self.job.layout.parts(name, info.torch_dtype, info.shape).items()}
                for part in stored.values():
                    self.ranks.broadcast(part, owner)
                for part, tensor in stored.items():
                    self.shard.put(part, tensor.cpu())
                if role not in solved:
                    w[(role, "weight")] = self.job.layout.weight(name, stored)
