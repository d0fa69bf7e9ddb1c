"""Buffer-resident tensors (``moe_a2a.resident``): interleaved operations on one buffer never give stale rows.

The Megatron dispatcher receives dispatched rows in the buffer and writes the combine input there. Two
micro-batches in flight on the same buffer (an overlap schedule) put a second dispatch between the first
one's dispatch and its permute, and between its combine input and its combine; backward interleaves too.
Results must equal the plain path's, with the held views copied out.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from moe_a2a import resident


class _FakeBuffer:
    """Any weak-referenceable object stands for a buffer in the bookkeeping."""


def test_claim_returns_view_copy_or_raises():
    buf = _FakeBuffer()
    base = torch.randn(4, 3, requires_grad=True)
    view = resident.hold(buf, base * 2)
    assert resident.claim(view) is view  # no operation in between: read in place
    view = resident.hold(buf, base * 2)
    want = view.detach().clone()
    resident.begin(buf)  # the next operation copies the held view out...
    view.detach().zero_()  # ...before it overwrites the buffer
    got = resident.claim(view)
    assert got is not view and torch.equal(got, want)
    got.sum().backward()  # the copy keeps the gradient path to the view's producer
    assert torch.equal(base.grad, torch.full_like(base, 2.0))
    assert resident.stats(buf)["copies"] == 1 and resident.stats(buf)["held"] == 0
    other = torch.randn(2)
    assert resident.claim(other) is other  # not held: passes as is
    view = resident.hold(buf, torch.randn(2))
    resident.of(buf).epoch += 1  # an operation that bypassed begin()
    with pytest.raises(RuntimeError, match="overwritten before it was read"):
        resident.claim(view)


HIDDEN, EXPERTS, TOPK, TOKENS = 16, 8, 2, 12


def _dispatcher(resident_mode: bool, kind: str):
    """The ``moe_a2a`` dispatcher, or megatron's ``flex`` one after ``install(buffer_resident=...)``."""
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.moe.token_dispatcher import MoEFlexTokenDispatcher

    import moe_a2a.megatron as mm
    from moe_a2a.megatron.dispatcher import MoEA2ATokenDispatcher

    cfg = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=4, ffn_hidden_size=32,
                            num_moe_experts=EXPERTS, moe_router_topk=TOPK, expert_model_parallel_size=2,
                            moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="deepep",
                            use_cpu_initialization=True, params_dtype=torch.bfloat16, bf16=True,
                            moe_router_dtype="fp32", add_bias_linear=False)
    cfg.moe_a2a_buffer_resident = resident_mode
    ep = torch.distributed.get_world_size()
    local = EXPERTS // ep
    rank = torch.distributed.get_rank()
    if kind == "flex":
        mm.uninstall()
        assert mm.install(buffer_resident=resident_mode)["buffer_resident"] == resident_mode
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        return MoEFlexTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), cfg,
                                      pg_collection=get_default_pg_collection())
    return MoEA2ATokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), cfg)


def _inputs(rank: int, mb: int, device="cpu"):
    gen = torch.Generator().manual_seed(1000 * rank + mb)
    x = torch.randn(TOKENS, 1, HIDDEN, generator=gen).bfloat16()
    logits = torch.randn(TOKENS, EXPERTS, generator=gen)
    logits[:, 0] += 1.0  # skew
    top = logits.topk(TOPK, dim=1).indices
    routing_map = torch.zeros(TOKENS, EXPERTS, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.where(routing_map, logits.softmax(1), 0.0)
    dy = torch.randn(TOKENS, 1, HIDDEN, generator=gen).bfloat16()
    scale = 1 + torch.rand(EXPERTS, HIDDEN, generator=gen)  # an "expert": a per-expert row scaling
    return tuple(t.to(device) for t in (x, routing_map, probs, dy, scale))


def _experts(tokens, counts, probs, scale, rank, local):
    chunks = tokens.split(counts.tolist())
    out = [c * scale[rank * local + e].to(c.dtype) for e, c in enumerate(chunks)]
    return torch.cat(out) * probs.unsqueeze(1).to(tokens.dtype)


def _micro_batches(rank: int, resident_mode: bool, interleave: bool, device="cpu", kind="moe_a2a"):
    """Run two micro-batches through two dispatchers (interleaved stage by stage, or one after the other);
    returns outputs and gradients of x and probs."""
    disps = [_dispatcher(resident_mode, kind) for _ in range(2)]
    local = disps[0].num_local_experts
    data = [_inputs(rank, mb, device) for mb in range(2)]
    xs = [d[0].clone().requires_grad_(True) for d in data]
    ps = [d[2].clone().requires_grad_(True) for d in data]

    stages = []  # per micro-batch: a list of steps, each mapping the state to the next
    state = [dict() for _ in range(2)]

    def steps(mb):
        d, (_, routing_map, _, _, scale) = disps[mb], data[mb]
        s = state[mb]

        def pre():
            s["h"], s["p"] = d.dispatch_preprocess(xs[mb], routing_map, ps[mb])

        def dispatch():
            s["h"], s["p"] = d.token_dispatch(s["h"], s["p"])

        def post():
            s["h"], s["counts"], s["p"] = d.dispatch_postprocess(s["h"], s["p"])
            s["h"] = _experts(s["h"], s["counts"], s["p"], scale, rank, local)

        def cpre():
            s["h"] = d.combine_preprocess(s["h"])

        def combine():
            s["out"] = d.combine_postprocess(d.token_combine(s["h"]))

        return [pre, dispatch, post, cpre, combine]

    stages = [steps(0), steps(1)]
    order = ([stages[0][0], stages[0][1], stages[1][0], stages[1][1], stages[0][2], stages[1][2],
              stages[0][3], stages[1][3], stages[0][4], stages[1][4]] if interleave
             else stages[0] + stages[1])
    for step in order:
        step()
    loss = sum((state[mb]["out"].float() * data[mb][3].float()).sum() for mb in range(2))
    loss.backward()
    return [state[mb]["out"].detach() for mb in range(2)] + [t.grad for t in xs] + [t.grad for t in ps]


def _stats():
    """Copies and held views summed over every buffer (the dispatcher's group is megatron's tp_ep group)."""
    states = list(resident._residency.values())
    assert states, "no buffer was used"
    return {"copies": sum(s.copies for s in states), "held": sum(len(s) for s in states)}


def _simulate_staging():
    """Make the CPU reference backend behave like the kernels' registered buffer: one staging area per
    Buffer, where a ``recv_x_in_buffer`` dispatch puts its rows and ``get_next_combine_buffer`` hands out
    the combine input, and that every dispatch, combine and ``get_next_combine_buffer`` overwrites (with
    random bytes here). A view read after another operation then gives garbage, as on the GPU."""
    from moe_a2a.buffer import Buffer

    dispatch, combine = Buffer.dispatch, Buffer.combine
    areas = {}

    def raw(buf):
        return areas.setdefault(id(buf), torch.empty(1 << 20, dtype=torch.uint8))

    def area(buf, dtype, rows, hidden):
        size = torch.empty((), dtype=dtype).element_size()
        return raw(buf)[:rows * hidden * size].view(dtype).view(rows, hidden)

    def sim_dispatch(self, x, *args, recv_x_in_buffer=False, **kwargs):
        out = dispatch(self, x, *args, **kwargs)
        raw(self).random_(0, 256)
        if recv_x_in_buffer:
            recv = out[0]
            out = (area(self, recv.dtype, *recv.shape).copy_(recv),) + tuple(out[1:])
        return out

    def sim_combine(self, *args, **kwargs):
        out = combine(self, *args, **kwargs)
        raw(self).random_(0, 256)
        return out

    def sim_next_combine_buffer(self, handle, hidden=None):
        raw(self).random_(0, 256)
        return area(self, torch.bfloat16, handle.num_recv_tokens, hidden)

    Buffer.dispatch, Buffer.combine = sim_dispatch, sim_combine
    Buffer.get_next_combine_buffer = sim_next_combine_buffer


def _check_interleaved(rank: int, world_size: int):
    from megatron.core import parallel_state as ps

    import moe_a2a.megatron as mm

    _simulate_staging()  # a spawned rank: the patch ends with the process
    with mm.cpu_context(enabled=True):
        ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=world_size)
        want = _micro_batches(rank, resident_mode=False, interleave=False)
        for interleave in (False, True):
            before = _stats()
            got = _micro_batches(rank, resident_mode=True, interleave=interleave)
            after = _stats()
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
            assert after["held"] == 0, after  # every view was read (claimed)
            copies = after["copies"] - before["copies"]
            if interleave:
                # forward: the 2nd dispatch before the 1st permute, the 2nd combine input before the 1st
                # combine (and the 1st combine before the 2nd reads its own); backward adds more
                assert copies >= 2, (before, after)
            else:
                assert copies == 0, (before, after)  # in order: nothing copied, everything read in place
        # The resident dispatcher sized its buffer for the most rows a rank can receive (tokens x ranks).
        from moe_a2a import Buffer, fused_a2a
        from moe_a2a.config import combine_input_bytes

        ring = max(c.get_nvl_buffer_size_hint(HIDDEN * 2, world_size) for c in (
            Buffer.get_dispatch_config(world_size), Buffer.get_combine_config(world_size)))
        assert max(b.num_nvl_bytes for b in fused_a2a._buffers.values()) >= \
            ring + combine_input_bytes(TOKENS * world_size, HIDDEN * 2, TOPK)
        # Plain mode holds nothing.
        before = _stats()
        _micro_batches(rank, resident_mode=False, interleave=True)
        assert _stats()["copies"] == before["copies"]
        # megatron's flex dispatcher after install(): its permute reads the received rows through claim, its
        # unpermute sums into the combine input (moe_a2a's SumRows) and the combine reads them there.
        from moe_a2a.permute import SumRows

        sums = []
        apply = SumRows.apply
        SumRows.apply = lambda *args: sums.append(args[3]) or apply(*args)
        want = _micro_batches(rank, resident_mode=False, interleave=False, kind="flex")
        assert not sums, "plain flex runs megatron's own unpermute"
        for interleave in (False, True):
            before = _stats()
            got = _micro_batches(rank, resident_mode=True, interleave=interleave, kind="flex")
            after = _stats()
            # Up to two expert rows per token and rank here: one rounding either way, so the sums are equal.
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0)
            assert after["held"] == 0, after
            assert (after["copies"] > before["copies"]) == interleave, (interleave, before, after)
            assert len(sums) == 2 and all(target is not None for target in sums), sums  # one per micro-batch
            sums.clear()
        SumRows.apply = apply
        mm.uninstall()
        ps.destroy_model_parallel()


@pytest.mark.megatron
def test_interleaved_micro_batches_on_one_buffer_2_ranks():
    pytest.importorskip("megatron.core")
    run_distributed(_check_interleaved, 2)
