"""``python -m moe_a2a demo``: dispatch and combine across CPU ranks, checked end to end.

Spawns ``--ranks`` gloo processes. Each routes random BF16 tokens to top-k experts, dispatches them,
applies one scalar "expert" per local expert, combines with the routing weights, and checks the result
against the same MoE computed locally. Prints what each rank sent and received.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from .launch import RanksFailed, spawn


def _rank_main(rank: int, num_ranks: int, args) -> None:
    from moe_a2a import Buffer

    num_experts = args.experts
    per_rank = num_experts // num_ranks
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).bfloat16()
    topk_weights, topk_idx = torch.rand(args.tokens, num_experts, generator=gen).softmax(1).topk(args.topk, dim=1)
    expert_scale = torch.arange(1, num_experts + 1, dtype=torch.float32) / num_experts  # expert e multiplies by this

    # Room for both directions: the default combine config may need more than the dispatch one.
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(args.hidden * 2, num_ranks)
                        for config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)))
    buffer = Buffer(dist.group.WORLD, num_nvl_bytes)
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts)
    recv_x, recv_idx, recv_w, per_expert, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=num_tokens_per_rank, is_token_in_rank=is_token_in_rank,
        num_tokens_per_expert=num_tokens_per_expert, topk_idx=topk_idx, topk_weights=topk_weights)

    # Each received token: sum over its local experts of weight * scale_e * x.
    local_scale = expert_scale[rank * per_rank:(rank + 1) * per_rank]
    factor = (recv_w * torch.where(recv_idx >= 0, local_scale[recv_idx.clamp(min=0)], 0)).sum(1, keepdim=True)
    expert_out = (recv_x.float() * factor).bfloat16()
    combined, _, _ = buffer.combine(expert_out, handle)

    want = x.float() * (topk_weights * expert_scale[topk_idx]).sum(1, keepdim=True)
    err = (combined.float() - want).abs().max().item() if args.tokens else 0.0
    ok = err <= 0.05 * max(1.0, want.abs().max().item())
    print(f"rank {rank}: sent {num_tokens_per_rank.tolist()} tokens to ranks, received {recv_x.size(0)} "
          f"(per local expert {per_expert}), combine max error {err:.4f} {'OK' if ok else 'MISMATCH'}", flush=True)
    if not ok:
        raise RuntimeError(f"rank {rank}: combined tokens differ from the local MoE by {err:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_a2a demo", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--topk", type=int, default=4)
    args = parser.parse_args(argv)
    if args.experts % args.ranks or args.topk > args.experts:
        print(f"error: --experts ({args.experts}) must be divisible by --ranks ({args.ranks}) and >= --topk",
              file=sys.stderr)
        return 2
    try:
        spawn(_rank_main, args.ranks, args, timeout=600.0)
    except RanksFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print(f"demo: {args.ranks} ranks dispatched and combined {args.tokens} tokens each, results match")
    return 0
