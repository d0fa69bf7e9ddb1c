"""MoE-layer step benchmark: a whole MoE layer, forward and backward, on N ranks, in three modes in one run.

Invoked as ``python -m benchmarks.moe_layer [options]`` (or ``python -m moe_a2a bench moe-layer [options]``)
from the repository root, e.g.::

    python -m benchmarks.moe_layer --ranks 8                     # 8 ranks: one per GPU, or sharing one under MPS
    python -m benchmarks.moe_layer --device cpu --ranks 2 --tokens 16 --hidden 32 --ffn 16 --experts 4 --topk 2

One step is what a training step spends in the layer: router (linear, softmax, top-k), dispatch, permute to
experts, the experts' GEMMs (``x @ w1``, GELU, ``@ w2``, times the routing weight; ``torch._grouped_mm`` where
it runs, else a loop of matmuls), unpermute, combine; then the backward of all of it. Modes, same inputs
and weights:

* ``plain``: ``moe_a2a.fused_a2a.fused_dispatch`` / ``fused_combine`` with a permute around them (what
  the Megatron dispatcher does with ``moe_a2a_buffer_resident=False``);
* ``resident``: the buffer-resident calls (rows permuted straight from the receive buffer, the unpermute
  written straight into the combine input, likewise backward): the Megatron dispatcher's default;
* ``all_to_all``: ``torch.distributed`` ``all_to_all_single`` with the permutes Megatron's ``alltoall``
  dispatcher does around it (NCCL with one rank per GPU; gloo otherwise, through host memory for CUDA
  tensors, which makes it no baseline for speed there: the JSON names the transport).

Reported per mode: step time (median over loops of the mean of ``--iters`` steps, slowest rank), the time of
the same step without the expert GEMMs, their ratio (``comm_share``: communication plus permutes and router,
the part the GEMMs do not hide), the ratio to ``plain``, and the largest difference to ``plain`` of the output
and the input gradient (a check that every mode computes the same layer). JSON goes to ``--out``
(default ``docs/perf/moe_layer_<device>.json``) with the GPU model named.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_a2a.launch import mps_if_needed, spawn

from . import common

MODES = ("plain", "resident", "all_to_all")


# ------------------------------------------------------------------------------------------- layer
class _Layer:
    """Router and local experts of one rank, from a seed shared by every mode."""

    def __init__(self, rank: int, num_ranks: int, opts: Dict, device: torch.device, dtype: torch.dtype):
        gen = torch.Generator().manual_seed(1234)  # the router is replicated: same on every rank
        h, f, e = opts["hidden"], opts["ffn"], opts["experts"]
        self.num_local = e // num_ranks
        self.router = (torch.randn(h, e, generator=gen) / h ** 0.5).to(device).requires_grad_(True)
        gen = torch.Generator().manual_seed(5678 + rank)
        self.w1 = (torch.randn(self.num_local, h, f, generator=gen) / h ** 0.5).to(device, dtype).requires_grad_(True)
        self.w2 = (torch.randn(self.num_local, f, h, generator=gen) / f ** 0.5).to(device, dtype).requires_grad_(True)
        self.topk, self.num_experts = opts["topk"], e
        self.grouped = opts["gemm"] == "grouped" and device.type == "cuda" and _grouped_mm_works(device, dtype)

    def route(self, x):
        """``([T, k] int64 expert ids, [T, k] float32 weights summing to 1)``."""
        probs = torch.softmax(x.float() @ self.router, dim=1)
        w, idx = probs.topk(self.topk, dim=1)
        return idx, w / w.sum(1, keepdim=True)

    def experts(self, h, counts: List[int], probs, gemms: bool = True):
        """``[P, H]`` expert outputs of ``h`` ``[P, H]`` grouped by local expert (``counts`` rows each)."""
        if gemms:
            if self.grouped:
                try:
                    offs = torch.tensor(counts, device=h.device).cumsum(0).to(torch.int32)
                    a = torch._grouped_mm(h, self.w1, offs=offs)
                    h = torch._grouped_mm(F.gelu(a), self.w2, offs=offs)
                except (RuntimeError, TypeError, NotImplementedError) as exc:
                    print(f"torch._grouped_mm failed ({exc}); using a loop of matmuls", flush=True)
                    self.grouped = False
                    return self.experts(h, counts, probs)
            else:
                parts = [F.gelu(c @ self.w1[i]) @ self.w2[i] for i, c in enumerate(h.split(counts))]
                h = torch.cat(parts) if parts else h
        return h * probs.unsqueeze(1).to(h.dtype)


def _grouped_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here (it needs a recent GPU and torch)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.randn(48, 64, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(3, 64, 32, device=device, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 32, 48], device=device, dtype=torch.int32)
        torch._grouped_mm(a, b, offs=offs).float().sum().backward()
        return a.grad is not None and b.grad is not None
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        print(f"torch._grouped_mm unavailable here ({exc}); the experts loop over matmuls", flush=True)
        return False


def _fused_step(layer, x, group, resident_mode: bool, gemms: bool, seen=None):
    from moe_a2a import fused_a2a, resident
    from moe_a2a.permute import GatherRows, SumRows, group_by_expert

    idx, w = layer.route(x)
    if resident_mode:
        fused_a2a.reserve_receive_rows(group, x.size(0) * group.size())
        recv, recv_idx, recv_w, counts, handle = fused_a2a.fused_dispatch_resident(x, idx, w, layer.num_experts, group)
        recv = resident.claim(recv)
    else:
        recv, recv_idx, recv_w, counts, handle = fused_a2a.fused_dispatch(x, idx, w, layer.num_experts, group)
    src, row_probs = group_by_expert(recv_idx, recv_w, counts, layer.num_local)
    h = GatherRows.apply(recv, src, (group, handle, idx.size(1)) if resident_mode else None)
    y = layer.experts(h, counts.tolist(), row_probs, gemms)
    summed = SumRows.apply(y, src, recv.size(0), (group, handle, 0) if resident_mode else None)
    if seen is not None and x.is_cuda:
        # Whether the rows really lived in the buffer (too small a buffer falls back to ordinary tensors).
        base = fused_a2a.get_buffer(group, fused_a2a.get_hidden_bytes(x)).get_local_buffer_tensor(torch.uint8)
        seen.update(recv_in_buffer=recv.data_ptr() == base.data_ptr(),
                    combine_input_in_buffer=summed.data_ptr() == base.data_ptr())
    combine = fused_a2a.fused_combine_resident if resident_mode else fused_a2a.fused_combine
    return combine(summed, group, handle)[0]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with autograd (backward: the reverse exchange), through host memory where the
    group's backend cannot take the tensor's device (gloo with CUDA tensors)."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group, via_host):
        ctx.splits, ctx.group, ctx.via_host = (out_splits, in_splits), group, via_host
        return _exchange(x, out_splits, in_splits, group, via_host)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad.contiguous(), in_splits, out_splits, ctx.group, ctx.via_host), None, None, None, None


def _exchange(x, out_splits, in_splits, group, via_host):
    src = x.cpu() if via_host else x
    out = src.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, src.contiguous(), out_splits, in_splits, group=group)
    return out.to(x.device) if via_host else out


def _all_to_all_step(layer, x, group, via_host: bool, gemms: bool):
    """Megatron's alltoall dispatcher in short: sort (token, expert) pairs by expert, exchange, sort the
    received rows by local expert, experts, and back the same way; the weights are applied in the experts."""
    num_ranks, num_local = group.size(), layer.num_local
    idx, w = layer.route(x)
    flat = idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tokens = torch.arange(x.size(0), device=x.device).repeat_interleave(idx.size(1))[order]
    experts = flat[order]
    per_expert = torch.bincount(experts, minlength=layer.num_experts)
    send_counts = per_expert.cpu() if via_host else per_expert
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)  # [R * L]: what each source sends here
    recv_matrix = recv_counts.cpu().view(num_ranks, num_local)
    in_splits = per_expert.view(num_ranks, num_local).sum(1).tolist()
    out_splits = recv_matrix.sum(1).tolist()
    sent = x.index_select(0, tokens)  # permute 1
    recv = _AllToAll.apply(sent, out_splits, in_splits, group, via_host)
    recv_w = _AllToAll.apply(w.reshape(-1)[order].unsqueeze(1), out_splits, in_splits, group, via_host).squeeze(1)
    local = torch.arange(num_local).repeat(num_ranks).repeat_interleave(recv_matrix.reshape(-1)).to(x.device)
    by_expert = torch.argsort(local, stable=True)  # permute 2
    h = recv.index_select(0, by_expert)
    y = layer.experts(h, recv_matrix.sum(0).tolist(), recv_w.index_select(0, by_expert), gemms)
    back = torch.empty_like(y).index_copy(0, by_expert, y)  # unpermute 2
    returned = _AllToAll.apply(back, in_splits, out_splits, group, via_host)
    out = torch.zeros(x.size(0), x.size(1), dtype=torch.float32, device=x.device)
    return out.index_add(0, tokens, returned.float()).to(x.dtype)  # unpermute 1


# ------------------------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_us(step, device, warmup: int, loops: int, iters: int) -> float:
    """Median over ``loops`` of the mean of ``iters`` steps, on the slowest rank."""
    for _ in range(warmup):
        step()
    _sync(device)
    samples = []
    for _ in range(loops):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e6 / iters)
    mine = torch.tensor([statistics.median(samples)], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return float(mine)


def _worker(rank: int, num_ranks: int, opts: Dict):
    from moe_a2a import fused_a2a

    device = torch.device(opts["device"], rank % torch.cuda.device_count()) if opts["device"] == "cuda" \
        else torch.device("cpu")
    dtype = torch.bfloat16
    world = dist.group.WORLD
    per_gpu = device.type == "cuda" and 1 < num_ranks <= torch.cuda.device_count()
    a2a_group = dist.new_group(backend="nccl") if per_gpu else world
    via_host = device.type == "cuda" and not per_gpu
    if device.type == "cuda":
        from moe_a2a.launch import max_num_sms_per_rank

        fused_a2a.set_deepep_num_sms(max(2, min(opts["sms"], max_num_sms_per_rank(num_ranks)) // 2 * 2))
    layer = _Layer(rank, num_ranks, opts, device, dtype)
    gen = torch.Generator().manual_seed(100 + rank)
    x0 = torch.randn(opts["tokens"], opts["hidden"], generator=gen).to(device, dtype)
    dy = torch.randn(opts["tokens"], opts["hidden"], generator=gen).to(device, dtype)

    def run(mode, gemms=True, seen=None):
        x = x0.clone().requires_grad_(True)
        if mode == "all_to_all":
            out = _all_to_all_step(layer, x, a2a_group, via_host, gemms)
        else:
            out = _fused_step(layer, x, world, mode == "resident", gemms, seen)
        (out.float() * dy.float()).sum().backward()
        return out.detach(), x.grad

    results = {}
    reference = None
    for mode in opts["modes"]:
        seen = {}
        out, grad = run(mode, seen=seen)
        if reference is None:
            reference = (out, grad)
        diffs = [float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
                 for a, b in zip((out, grad), reference)]
        step = _time_us(lambda: run(mode), device, opts["warmup"], opts["loops"], opts["iters"])
        bare = _time_us(lambda: run(mode, gemms=False), device, opts["warmup"], opts["loops"], opts["iters"])
        worst = torch.tensor(diffs, dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        results[mode] = {"step_us": step, "no_gemm_step_us": bare, "comm_share": bare / step,
                         "max_abs_diff_out": float(worst[0]), "max_abs_diff_grad_x": float(worst[1]), **seen}
    first = opts["modes"][0]
    for mode in results:
        results[mode][f"ratio_to_{first}"] = results[mode]["step_us"] / results[first]["step_us"]
    transport = {"fused_a2a": "moe_a2a kernels" if device.type == "cuda" else "moe_a2a reference (gloo)",
                 "all_to_all": "nccl" if per_gpu else ("gloo via host memory" if via_host else "gloo")}
    return {"results": results, "transport": transport, "gemm": "grouped_mm" if layer.grouped else "loop"}


def run(opts: Dict) -> Dict:
    """Spawn ``opts["ranks"]`` ranks (under CUDA MPS when they share GPUs) and return rank 0's results."""
    num_ranks = opts["ranks"]
    cuda = opts["device"] == "cuda"
    with mps_if_needed(num_ranks) if cuda else contextlib.nullcontext():
        return spawn(_worker, num_ranks, opts, cuda_device=cuda, timeout=opts["timeout"])[0]


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(0) if device == "cuda" else "cpu"


def format_table(report: Dict) -> str:
    first = report["modes"][0]
    lines = [f"MoE layer step on {report['ranks']} ranks, {report['device']} "
             f"(tokens {report['shape']['tokens']}/rank, hidden {report['shape']['hidden']}, "
             f"ffn {report['shape']['ffn']}, top-{report['shape']['topk']} of {report['shape']['experts']}, "
             f"GEMMs: {report['gemm']})",
             f"{'mode':12s} {'step ms':>9s} {'no-GEMM ms':>11s} {'comm share':>11s} {'vs ' + first:>10s} "
             f"{'max |diff|':>11s}  transport"]
    for mode, r in report["results"].items():
        transport = report["transport"]["all_to_all" if mode == "all_to_all" else "fused_a2a"]
        lines.append(f"{mode:12s} {r['step_us'] / 1e3:9.3f} {r['no_gemm_step_us'] / 1e3:11.3f} "
                     f"{r['comm_share']:11.2f} {r[f'ratio_to_{first}']:10.3f} "
                     f"{max(r['max_abs_diff_out'], r['max_abs_diff_grad_x']):11.2e}  {transport}"
                     + (f" (received rows in buffer: {r['recv_in_buffer']}, combine input in buffer: "
                        f"{r['combine_input_in_buffer']})" if "recv_in_buffer" in r else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.moe_layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--ranks", type=int, default=None, help="ranks (default 8 on GPUs, 2 on CPU)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--ffn", type=int, default=2048, help="expert FFN hidden size")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--sms", type=int, default=24, help="SMs of the moe_a2a kernels (capped so ranks fit)")
    p.add_argument("--gemm", choices=("grouped", "loop"), default="grouped")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loops", type=int, default=5)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before the ranks are killed")
    p.add_argument("--out", default=None, help="JSON path (default docs/perf/moe_layer_<device>.json)")
    args = p.parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes {args.modes!r}: expected a comma-separated subset of {MODES}")
    ranks = args.ranks if args.ranks is not None else (8 if device == "cuda" else 2)
    if ranks < 2 or args.experts % ranks:
        raise ValueError(f"--ranks {ranks} must be >= 2 and divide --experts {args.experts}")
    if args.topk > args.experts or args.topk < 1:
        raise ValueError(f"--topk {args.topk} must be in [1, --experts {args.experts}]")
    opts = dict(vars(args), device=device, ranks=ranks, modes=modes)
    out = run(opts)
    name = _device_name(device)
    report = {"benchmark": "moe_layer", "device": name, "ranks": ranks, "commit": common.commit(), "modes": modes,
              "shape": {k: args.__dict__[k] for k in ("tokens", "hidden", "ffn", "experts", "topk")},
              "sms": args.sms, "warmup": args.warmup, "loops": args.loops, "iters": args.iters, **out}
    slug = "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_")
    path = args.out or os.path.join("docs", "perf", f"moe_layer_{slug}.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(format_table(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
