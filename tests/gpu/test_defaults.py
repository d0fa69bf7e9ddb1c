"""What a user who changes no setting gets, with 2, 4 and 8 ranks on one GPU: every output correct, or an error.

No ``set_num_sms``, the default ``Config``, the buffer sized by the README's recipe, outputs read at once.
With 8 ranks on one GPU the default SM count (20 per rank) does not fit a GPU's SMs: the buffer must fit it
(``Buffer.max_num_sms``) rather than let kernels wait for blocks that cannot start. Then the same calls with
GEMMs running on a side stream, and a failure that must raise on the next synchronize instead of returning
outputs the kernels never wrote.
"""
import time

import pytest
import torch
import torch.distributed as dist

from harness import gather, routing, run_ranks, set_rank_device, skip_reason, synchronize_after_fault
from moe_a2a import Buffer, Config

HIDDEN, NUM_EXPERTS, TOPK = 256, 64, 4


def _readme_buffer(group, hidden, **kwargs):
    """The README's quick-start sizing (one hint serves dispatch and combine)."""
    config = Buffer.get_dispatch_config(group.size())
    return Buffer(group, num_nvl_bytes=config.get_nvl_buffer_size_hint(hidden * 2, group.size()), **kwargs)


def _round_trip(buf, x, idx, w):
    ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(idx, NUM_EXPERTS)
    recv_x, recv_idx, recv_w, counts, handle, _ = buf.dispatch(
        x, num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, topk_idx=idx,
        topk_weights=w)
    combined, _, _ = buf.combine(recv_x, handle, topk_weights=recv_w)
    return recv_x, recv_idx, recv_w, counts, combined


def _defaults(rank, num_ranks, with_gemms):
    device = set_rank_device(rank)
    group = dist.group.WORLD
    kernels = _readme_buffer(group, HIDDEN)
    reference = _readme_buffer(group, HIDDEN, backend="reference")
    assert kernels.backend == "cuda"
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    ranks_per_gpu = -(-num_ranks // torch.cuda.device_count())
    assert kernels.max_num_sms * ranks_per_gpu <= sms
    gen = torch.Generator().manual_seed(rank)
    side = torch.cuda.Stream(device)
    a = torch.randn(2048, 2048, device=device, dtype=torch.bfloat16)
    for num_tokens in (50 + 13 * rank, 1, 4096 // num_ranks):
        x = torch.randn(num_tokens, HIDDEN, generator=gen).bfloat16().to(device)
        idx = routing(num_tokens, NUM_EXPERTS, TOPK, gen).to(device)
        w = torch.rand(num_tokens, TOPK, generator=gen).to(device)
        if with_gemms:  # a training step overlaps communication with expert GEMMs on another stream
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(200):
                    a = (a @ a).clamp_(-1, 1)
        got = _round_trip(kernels, x, idx, w)
        want = _round_trip(reference, x, idx, w)
        for name, g, r in zip(("recv_x", "recv_topk_idx", "recv_topk_weights"), got[:3], want[:3]):
            assert torch.equal(g.cpu(), r.cpu()), f"rank {rank}: {name} differs from the reference"
        assert got[3] == want[3]
        torch.testing.assert_close(got[4].float().cpu(), want[4].float().cpu(), rtol=1e-2, atol=1e-2)
        assert num_tokens == 0 or got[0].numel() == 0 or got[0].abs().sum() > 0
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_default_settings_are_correct(num_ranks):
    reason = skip_reason(num_ranks)
    if reason:
        pytest.skip(reason)
    run_ranks(_defaults, num_ranks, False, timeout=300.0)


def test_default_settings_with_gemms_on_a_side_stream():
    reason = skip_reason(8)
    if reason:
        pytest.skip(reason)
    run_ranks(_defaults, 8, True, timeout=300.0)


def _chosen_sms_are_capped(rank, num_ranks):
    set_rank_device(rank)
    buf = _readme_buffer(dist.group.WORLD, HIDDEN)
    budget = buf.max_num_sms
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(64, HIDDEN, generator=gen).bfloat16().cuda()
    idx = routing(64, NUM_EXPERTS, TOPK, gen).cuda()
    ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(idx, NUM_EXPERTS)
    args = dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, topk_idx=idx)
    with pytest.warns(RuntimeWarning, match=rf"asked for {budget + 2} SMs .* using {budget}"):
        capped, *_ = buf.dispatch(x, config=Config(budget + 2), **args)
    fitted, *_ = buf.dispatch(x, config=Config(budget), **args)
    assert torch.equal(capped.cpu(), fitted.cpu())


def test_an_sm_count_that_cannot_fit_is_capped_with_a_warning():
    reason = skip_reason(8)
    if reason:
        pytest.skip(reason)
    run_ranks(_chosen_sms_are_capped, 8)


def _failure_raises(rank, num_ranks):
    """Rank 1 starts its dispatch after the others' timeout. With ``num_worst_tokens`` nothing waits on the host,
    so rank 0's call returns at once; its outputs must not be readable as valid: the synchronize raises, and
    so does every later call on the buffer, naming the step and the missing rank."""
    device = set_rank_device(rank)
    buf = _readme_buffer(dist.group.WORLD, HIDDEN, timeout_s=1.0)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(32, HIDDEN, generator=gen).bfloat16().to(device)
    idx = routing(32, NUM_EXPERTS, TOPK, gen).to(device)
    ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(idx, NUM_EXPERTS)
    args = dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, topk_idx=idx,
                num_worst_tokens=32 * num_ranks)
    buf.dispatch(x, **args)  # everyone present: fine
    torch.cuda.synchronize()
    dist.barrier()
    if rank == 1:
        time.sleep(4.0)  # well past the peers' 1 s timeout
    start = time.monotonic()
    try:
        recv_x, *_ = buf.dispatch(x, **args)
        recv_x.cpu()
        torch.cuda.synchronize()
    except RuntimeError:
        pass  # the kernel's trap, seen by this process
    else:
        raise AssertionError(f"rank {rank}: a dispatch whose peer never came returned outputs without an error")
    assert time.monotonic() - start < 30
    if rank == 0:
        with pytest.raises(RuntimeError, match=r"rank 0 timed out .* waiting for rank 1"):
            buf.dispatch(x, **args)
    dist.barrier()


def test_a_failed_kernel_raises_instead_of_returning():
    reason = skip_reason(2)
    if reason:
        pytest.skip(reason)
    run_ranks(_failure_raises, 2, timeout=120.0)


def _ranks_disagree(rank, num_ranks, what):
    """One rank calls with another hidden size (or dispatches while the other combines): the kernels compare
    every rank's call at the first barrier and fail instead of copying rows of the wrong size."""
    device = set_rank_device(rank)
    buf = _readme_buffer(dist.group.WORLD, 512, timeout_s=5.0)
    gen = torch.Generator().manual_seed(rank)
    hidden = 256 if rank == 0 or what != "hidden" else 512
    x = torch.randn(32, hidden, generator=gen).bfloat16().to(device)
    idx = routing(32, NUM_EXPERTS, TOPK, gen).to(device)
    ntpr, _, ntpe, in_rank, _ = buf.get_dispatch_layout(idx, NUM_EXPERTS)
    args = dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe, topk_idx=idx)
    recv_x, _, _, _, handle, _ = buf.dispatch(torch.randn(32, 256, generator=gen).bfloat16().to(device), **args)
    torch.cuda.synchronize()
    message = ""
    try:
        if what == "hidden":
            buf.dispatch(x, **args)
        elif rank == 0:
            buf.combine(recv_x, handle)
        else:
            buf.dispatch(x, handle=handle)
        torch.cuda.synchronize()
    except (ValueError, RuntimeError) as e:
        message = str(e)
    else:
        raise AssertionError(f"rank {rank}: a call that its peer did not match returned without an error")
    if not message.startswith("moe_a2a intranode"):  # this process saw the trap first: the record has the text
        try:
            buf.dispatch(x, **args)
        except RuntimeError as e:
            message = str(e)
    messages = gather(message)
    field = "bytes per row" if what == "hidden" else "operation"
    assert any(f"ranks disagree on the {field}" in m for m in messages), messages
    dist.barrier()
    synchronize_after_fault()


@pytest.mark.parametrize("what", ["hidden", "operation"])
def test_ranks_that_disagree_are_told(what):
    reason = skip_reason(2)
    if reason:
        pytest.skip(reason)
    run_ranks(_ranks_disagree, 2, what, timeout=120.0)
