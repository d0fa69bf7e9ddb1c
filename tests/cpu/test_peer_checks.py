"""Ranks that disagree, stall or die, and metadata that lies: every rank gets a readable error, never a wrong
tensor or a hang (reference backend, 2 gloo ranks)."""
import os
import time
import pytest
import torch
import torch.distributed as dist

from dist_utils import run_distributed
from moe_a2a import Buffer, agreement
from moe_a2a.backends import waits
from moe_a2a.backends.waits import CollectiveError

HIDDEN = 128
NUM_EXPERTS = 4


def _routing(rank, num_tokens=12, topk=2):
    gen = torch.Generator().manual_seed(7 + rank)
    idx = torch.rand(num_tokens, NUM_EXPERTS, generator=gen).topk(topk, dim=1).indices
    idx[0, 1] = -1
    return idx, torch.rand(num_tokens, topk, generator=gen)


def _readme_buffer(hidden=HIDDEN, **kw):
    """The buffer the README's quick start builds: sized from the dispatch config's hint only."""
    config = Buffer.get_dispatch_config(dist.get_world_size())
    return Buffer(dist.group.WORLD, num_nvl_bytes=config.get_nvl_buffer_size_hint(hidden * 2, dist.get_world_size()),
                  **kw)


def _layout(buffer, idx, num_experts=NUM_EXPERTS):
    ntpr, _, ntpe, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    return dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe)


def _disagreement_body(rank, num_ranks):
    buffer = _readme_buffer()
    idx, w = _routing(rank)
    layout = _layout(buffer, idx)
    # Hidden 64 on rank 0, 128 on rank 1: gloo would abort the process; every rank gets the same ValueError.
    x = torch.randn(idx.size(0), 64 if rank == 0 else HIDDEN).bfloat16()
    with pytest.raises(ValueError, match=r"hidden size of dispatch: rank 0: 64; rank 1: 128"):
        buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    x = torch.randn(idx.size(0), HIDDEN)
    with pytest.raises(ValueError, match=r"token dtype of dispatch: rank 0: torch.bfloat16; rank 1: torch.float32"):
        buffer.dispatch(x.bfloat16() if rank == 0 else x, topk_idx=idx, topk_weights=w, **layout)
    with pytest.raises(ValueError, match=r"top-k width of dispatch: rank 0: 2; rank 1: none"):
        buffer.dispatch(x, topk_idx=idx if rank == 0 else None, **layout)
    # Different number of experts: 4 on rank 0, 8 on rank 1.
    idx8 = torch.where(idx >= 0, idx * 2, idx)
    with pytest.raises(ValueError, match=r"number of experts of dispatch: rank 0: 4; rank 1: 8"):
        if rank == 0:
            buffer.dispatch(x, topk_idx=idx, **layout)
        else:
            buffer.dispatch(x, topk_idx=idx8, **_layout(buffer, idx8, 8))
    # One rank dispatches while the other combines.
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    with pytest.raises(ValueError, match=r"operation of the collective call: rank 0: dispatch; rank 1: combine"):
        if rank == 0:
            buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
        else:
            buffer.combine(recv_x, handle)
    # Handles of different dispatches (same routing, so the same counts): refused, not summed wrongly.
    _, _, _, _, handle2, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    assert handle.identity.epoch + 1 == handle2.identity.epoch
    assert handle.identity.fingerprint == handle2.identity.fingerprint  # same counts: the epoch tells them apart
    assert tuple(handle)[:6] == tuple(handle[i] for i in range(6))  # still indexable like DeepEP's 6-tuple
    with pytest.raises(ValueError, match=r"handle epoch of combine: rank 0: 0; rank 1: 1 .*same dispatch"):
        buffer.combine(recv_x, handle if rank == 0 else handle2)
    with pytest.raises(ValueError, match=r"handle epoch of cached dispatch"):
        buffer.dispatch(x, handle=handle if rank == 0 else handle2)
    # Low-latency mode: the same check in front of its exchanges.
    ll = Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(16, 256, num_ranks, NUM_EXPERTS),
                low_latency_mode=True)
    x_ll = torch.randn(idx.size(0), 128 if rank == 0 else 256).bfloat16()
    with pytest.raises(ValueError, match=r"hidden size of low-latency dispatch: rank 0: 128; rank 1: 256"):
        ll.low_latency_dispatch(x_ll, idx, 16, NUM_EXPERTS, use_fp8=False)
    # The buffer still works after refusals: the right handle combines what dispatch sent.
    combined, _, _ = buffer.combine(recv_x.float(), handle)
    sent = layout["is_token_in_rank"].sum(1, keepdim=True).float()
    torch.testing.assert_close(combined, x * sent)


def test_disagreeing_ranks_get_the_same_error():
    run_distributed(_disagreement_body, 2)


def _metadata_body(rank, num_ranks):
    buffer = _readme_buffer()
    idx, w = _routing(rank)
    layout = _layout(buffer, idx)
    x = torch.randn(idx.size(0), HIDDEN)
    zeros = dict(layout, num_tokens_per_expert=torch.zeros_like(layout["num_tokens_per_expert"]))
    with pytest.raises(ValueError, match=r"num_tokens_per_expert \[0, 0, 0, 0\] disagrees with topk_idx"):
        buffer.dispatch(x, topk_idx=idx, topk_weights=w, **zeros)
    lying = layout["is_token_in_rank"].clone()
    lying[3] = ~lying[3]
    lying_layout = dict(layout, is_token_in_rank=lying, num_tokens_per_rank=lying.sum(0, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"is_token_in_rank disagrees with topk_idx on 1 tokens, first token 3"):
        buffer.dispatch(x, topk_idx=idx, topk_weights=w, **lying_layout)
    with pytest.raises(ValueError, match=r"num_tokens_per_rank \[.*\] disagrees with is_token_in_rank"):
        buffer.dispatch(x, **dict(layout, num_tokens_per_rank=layout["num_tokens_per_rank"] + 1))
    from moe_a2a import checks

    # The layout get_dispatch_layout returned (and checked), passed on unmodified: no second value check.
    original = checks.routing_metadata, checks.expert_ids
    checks.routing_metadata = checks.expert_ids = None  # any call would raise TypeError
    try:
        buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    finally:
        checks.routing_metadata, checks.expert_ids = original
    # Modified in place since (or another topk_idx): checked again.
    fresh = _layout(buffer, idx)
    fresh["is_token_in_rank"][3] = ~fresh["is_token_in_rank"][3]
    with pytest.raises(ValueError, match=r"num_tokens_per_rank \[.*\] disagrees with is_token_in_rank"):
        buffer.dispatch(x, topk_idx=idx, topk_weights=w, **fresh)
    with pytest.raises(ValueError, match=r"topk_idx holds expert id 99"):
        buffer.dispatch(x, topk_idx=idx.clone().fill_(99), topk_weights=w, **_layout(buffer, idx))
    # check_values=False runs none of these checks; the per-expert counts still come from what arrived.

    unchecked = _readme_buffer(check_values=False)
    original = checks.routing_metadata
    checks.routing_metadata = None  # any call would raise TypeError
    try:
        _, _, _, counts, _, _ = unchecked.dispatch(x, topk_idx=idx, topk_weights=w, **zeros)
    finally:
        checks.routing_metadata = original
    all_idx = [None] * num_ranks
    dist.all_gather_object(all_idx, idx)
    every = torch.cat(all_idx).flatten()
    assert counts == [int((every == rank * 2 + e).sum()) for e in range(2)]


def test_check_values_checks_metadata_against_topk_idx():
    run_distributed(_metadata_body, 2)


def _stall_body(rank, num_ranks, mode):
    buffer = _readme_buffer(timeout_s=1.5)
    idx, w = _routing(rank)
    layout = _layout(buffer, idx)
    x = torch.randn(idx.size(0), HIDDEN)
    if rank == 1:
        if mode == "dead":
            os._exit(0)  # gone without a word: the survivor must name it
        time.sleep(8)  # stalled past rank 0's deadline and report window
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    waited = time.monotonic() - start
    text = str(info.value)
    assert "dispatch (count exchange) on rank 0" in text and "rank 1 of the group did not arrive" in text, text
    if mode == "stall" or "nccl" in str(dist.get_backend()):  # NCCL does not notice a peer's exit: a timeout
        assert "timed out after 1.5 s" in text and 1.4 < waited < 6, (waited, text)
    else:
        assert "lost a peer" in text and waited < 6, (waited, text)
    with pytest.raises(CollectiveError, match="refuses further calls"):
        buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    os._exit(0)  # the abandoned collective cannot be finished: leave without the harness's final barrier


@pytest.mark.parametrize("mode", ["stall", "dead"])
def test_stalled_or_dead_peer_is_named_within_the_deadline(mode):
    run_distributed(_stall_body, 2, mode, timeout=60)


def _barrier_body(rank, num_ranks, alone):
    """``waits.barrier`` (the all-reduce workspaces' meeting point): the rank left alone raises within its
    deadline, naming the rank that did not arrive, whether it is rank 0 or not (``monitored_barrier`` bounds
    only rank 0's wait)."""
    if rank != alone:
        time.sleep(8)  # never arrives, and lives past the lone rank's deadline and report window
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(CollectiveError) as info:
        waits.barrier(None, 1.0, "LamportWorkspace.grow", "AllReduce(timeout_s=...)")
    waited = time.monotonic() - start
    text = str(info.value)
    assert f"LamportWorkspace.grow on rank {alone} timed out after 1 s" in text, text
    assert f"rank {1 - alone} of the group did not arrive" in text, text
    assert "AllReduce(timeout_s=...) sets the deadline" in text and waited < 5, (waited, text)
    os._exit(0)


@pytest.mark.parametrize("alone", [0, 1])
def test_barrier_alone_raises_within_the_deadline(alone):
    run_distributed(_barrier_body, 2, alone, timeout=60)


def test_signature_messages():
    a = agreement.signature("combine", 128, torch.bfloat16, num_topk=2, weights_dtype=torch.float32)
    b = list(a)
    b[agreement.FIELDS.index("top-k weights dtype")] = agreement.dtype_code(torch.float64)
    assert agreement.disagreement([a, a]) is None
    assert agreement.disagreement([a, b, a], ranks=[0, 1, 2]) == (
        "ranks disagree on the top-k weights dtype of combine: ranks 0, 2: torch.float32; rank 1: torch.float64")


def test_checked_tensors_match_only_the_same_unmodified_tensors():
    from moe_a2a.checks import CheckedTensors

    a, b = torch.arange(4), torch.ones(2, dtype=torch.bool)
    stamp = CheckedTensors(a, None, b)
    assert stamp.same(a, None, b)
    assert not stamp.same(a.clone(), None, b)  # another tensor with equal values
    assert not stamp.same(a, b, None) and not stamp.same(a, None) and not stamp.same(a, None, b, None)
    b[0] = False  # modified in place: its version counter moved on
    assert not stamp.same(a, None, b)
    with torch.inference_mode():
        c = torch.zeros(3)
    assert not CheckedTensors(c).same(c)  # inference tensors keep no version counter
