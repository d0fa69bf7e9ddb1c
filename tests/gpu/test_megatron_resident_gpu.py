"""The Megatron dispatchers' buffer-resident mode on the kernels (moe_a2a's, and flex after install()): two
micro-batches interleaved on one buffer.

On the intranode kernels the dispatched rows and the combine input really are views of the registered
buffer, overwritten by the next operation. Interleaved or in order, the resident mode must give the plain
mode's outputs and gradients bit for bit, and the interleaved run must have copied views out.
"""
from __future__ import annotations

import pytest
import torch

from harness import run_ranks, set_rank_device, skip_reason

pytest.importorskip("megatron.core")


def _check(rank: int, num_ranks: int):
    from megatron.core import parallel_state as ps

    import test_resident as tr

    import moe_a2a.megatron as mm

    device = set_rank_device(rank)
    ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=num_ranks)
    # The moe_a2a dispatcher, and megatron's flex dispatcher after install() (its permute, unpermute and
    # combine on the buffer too); top-2 of 8 experts: at most two rows per token and rank, summed alike.
    for kind in ("moe_a2a", "flex"):
        want = tr._micro_batches(rank, resident_mode=False, interleave=False, device=device, kind=kind)
        for interleave in (False, True):
            before = tr._stats()["copies"]
            got = tr._micro_batches(rank, resident_mode=True, interleave=interleave, device=device, kind=kind)
            torch.cuda.synchronize()
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=kind)
            after = tr._stats()
            assert after["held"] == 0, (kind, after)
            least = 2 if kind == "moe_a2a" else 1  # as tests/cpu/test_resident.py counts them
            assert (after["copies"] - before >= least) if interleave else after["copies"] == before, \
                (kind, before, after)
    mm.uninstall()
    ps.destroy_model_parallel()


@pytest.mark.parametrize("num_ranks", [2, 8])
def test_dispatcher_interleaved_micro_batches_resident_vs_plain(num_ranks):
    reason = skip_reason(num_ranks)
    if reason:
        pytest.skip(reason)
    run_ranks(_check, num_ranks)
