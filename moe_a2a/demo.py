"""``python -m moe_a2a demo``: dispatch and combine across CPU ranks, checked end to end.

Spawns ``--ranks`` gloo processes. Each routes random BF16 tokens to top-k experts, dispatches them,
applies one scalar "expert" per local expert, combines with the routing weights, and checks the result
against the same MoE computed locally. Prints what each rank sent and received.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    from moe_a2a import Buffer

    num_ranks, num_experts = args.ranks, args.experts
    per_rank = num_experts // num_ranks
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).bfloat16()
    topk_weights, topk_idx = torch.rand(args.tokens, num_experts, generator=gen).softmax(1).topk(args.topk, dim=1)
    expert_scale = torch.arange(1, num_experts + 1, dtype=torch.float32) / num_experts  # expert e multiplies by this

    config = Buffer.get_dispatch_config(num_ranks)
    buffer = Buffer(dist.group.WORLD, config.get_nvl_buffer_size_hint(args.hidden * 2, num_ranks))
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
    dist.barrier()
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(args,), nprocs=args.ranks, join=True)
    print(f"demo: {args.ranks} ranks dispatched and combined {args.tokens} tokens each, results match")
    return 0
