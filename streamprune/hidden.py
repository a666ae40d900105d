"""Hidden states of token windows pushed through the blocks one at a time: the block loop's consumer that `eval`,
a run's calibration and evaluation streams and the task scorer all use."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from streamprune.activations import Activations, copy_store
from streamprune.arch.block import Carried, LayerPositions, Weights, positions
from streamprune.checkpoint import Checkpoint
from streamprune.forward import Routes, add_expert, embed_windows, finish_block, forward_block, head_nll, routed_rows
from streamprune.loop import Consumer
from streamprune.perlayer import PerLayerInputs
from streamprune.stream import Part


class HiddenStream(Consumer):
    """Hidden states of token windows (K, T) pushed through the blocks, a consumer of the block loop (`loop.walk`):
    `enter` runs a block's weights outside its routed experts (a dense block entirely, in place), `expert` adds one
    routed expert's weighted output for the tokens routed to it, `leave` ends the block. An MoE block writes into
    `scratch` (needed for MoE models), and the two buffers swap roles. `eval` is one stream over the checkpoint's
    blocks; a run's lane feeds its streams each block's weights as they become final, one routed expert at a time
    as it is pruned."""

    def __init__(self, ckpt: Checkpoint, windows: Tensor, device: torch.device, batch: int, store: Activations,
                 scratch: Activations | None = None, embed: bool = True, pos: LayerPositions | None = None) -> None:
        """`embed`: fill `store` with the windows' embeddings now (else later with `embed`, or by the caller); `pos`:
        the position tables of the windows' length, when another stream of that length has them."""
        self.ckpt, self.windows, self.device, self.batch = ckpt, windows, device, batch
        self.x, self.scratch = store, scratch
        self.routes: Routes | None = None  # of the MoE block entered, else None
        self.w: Weights = {}  # the MoE block entered, where its experts' input and its third pass need it
        # a model with per-layer inputs: the embeddings kept beside, in a buffer placed as `store` is
        self.inputs = PerLayerInputs(ckpt, windows, store.like("_embeds")) if ckpt.config.per_layer_dim else None
        self.kv: dict[str, Activations] = {}  # shared keys and values, by layer type, kept from the block storing them
        if embed:
            self.embed()
        self.pos = positions(ckpt.config, windows.shape[1]).to(device, torch.float32) if pos is None else pos

    def embed(self) -> None:
        """The windows' embeddings: the hidden states entering block 0 (and, for per-layer inputs, kept)."""
        embed_windows(self.ckpt, self.windows, self.device, self.x, self.batch)
        if self.inputs is not None:
            copy_store(self.x, self.inputs.embeds, self.batch)

    def carry(self, bid: int) -> Callable[[int, int], Carried] | None:
        """What windows i..j-1 bring block `bid` beside their hidden states (block.Carried): its per-layer inputs, the
        keys and values it reuses, and a buffer for its own where later blocks reuse them; None where it takes none."""
        cfg = self.ckpt.config
        inputs = None if self.inputs is None else self.inputs.of(bid, self.device)
        mode = cfg.kv_mode(bid)
        if inputs is None and mode is None:
            return None
        kind = cfg.layer_types[bid]
        if mode == "store" and kind not in self.kv:  # (B, T, keys then values) of every window, placed as they are
            b = cfg.block(bid)
            self.kv[kind] = self.x.like(f"_kv_{kind}", 2 * b.n_kv_heads * b.head_dim)
        store = self.kv.get(kind) if mode is not None else None

        def carried(i: int, j: int) -> Carried:
            c = Carried(per_layer=None if inputs is None else inputs(i, j))
            if mode == "reuse":
                assert store is not None, f"block {bid} reuses keys and values no earlier block kept"
                k, v = store.read(i, j, self.device).chunk(2, dim=-1)  # (B, T, nkv * hd) each
                b = cfg.block(cfg.kv_source(bid))
                c.kv = tuple(t.view(j - i, -1, b.n_kv_heads, b.head_dim).transpose(1, 2) for t in (k, v))
            elif mode == "store":
                assert store is not None
                c.keep_kv = lambda k, v: store.write(i, j, torch.cat(
                    [t.transpose(1, 2).reshape(j - i, t.shape[2], -1) for t in (k, v)], dim=-1))
            return c

        return carried

    @torch.no_grad()
    def enter(self, block: Part) -> None:
        bid = block.bid
        if self.ckpt.n_experts(bid):
            assert self.scratch is not None, "an MoE block needs a second activation buffer"
            self.routes = forward_block(self.ckpt, block.w, self.x, self.pos.of(bid), self.scratch, self.batch,
                                        self.device, carry=self.carry(bid))
            self.w = block.w if self.ckpt.config.moe_beside_mlp else {}
        else:
            forward_block(self.ckpt, block.w, self.x, self.pos.of(bid), self.x, self.batch, self.device,
                          carry=self.carry(bid))

    def expert(self, part: Part) -> None:
        assert self.routes is not None and self.scratch is not None, "an expert outside an MoE block"
        add_expert(self.ckpt, self.w, part.w, routed_rows(self.routes, part.xid), self.x, self.scratch, self.device)

    def leave(self, block: Part) -> None:
        if self.routes is not None:
            assert self.scratch is not None
            finish_block(self.ckpt, self.w, self.x, self.scratch, self.batch, self.device, self.carry(block.bid))
            self.swap()
            self.routes, self.w = None, {}

    def swap(self) -> None:
        """The output buffer becomes the next block's input."""
        assert self.scratch is not None
        self.x, self.scratch = self.scratch, self.x

    def nll(self) -> tuple[float, int]:
        """Summed next-token NLL after the last block (the final norm and head), and the predicted tokens."""
        return head_nll(self.ckpt, self.x, self.windows, self.device)

    def close(self) -> None:
        for store in (self.x, self.scratch):
            if store is not None:
                store.close()
        if self.inputs is not None:
            self.inputs.close()
        for store in self.kv.values():
            store.close()
        self.kv = {}
