"""Bytes, time and accuracy of each token format against BF16, normal and low-latency modes, in one run.

    python -m benchmarks formats                                   # 2 CPU ranks, reference backend
    python -m benchmarks formats --backend cuda --num-ranks 8 --tokens 128 --hidden 7168 --experts 256 \
        --topk 8 --json docs/perf/formats_ep8.json                 # the kernels, 8 ranks on one GPU (MPS)

Formats: dispatch BF16 / FP8 (e4m3, per-128 scales) / NVFP4 (e2m1, per-16 e4m3 scales, global scale);
combine BF16 / FP8 / LogFMT (low-latency; the normal combine has BF16 / FP8). ``--backend reference`` runs
every format on the reference backend (gloo; with ``--device cuda`` the codecs run on the GPU and the rows
go through host memory), so times compare formats on one path. ``--backend cuda`` runs each call on the CUDA
kernels where they have the format and on the reference backend otherwise (the row's ``path`` says which),
timed with CUDA events (median over ``--loops`` of ``--iters`` calls), ranks sharing the GPUs under MPS.

Per row: ``bytes`` the payload one rank sends per call (token rows with their scales, not the routing
metadata), ``ratio`` against BF16, ``time_us`` (slowest rank), and the error against the BF16 path:
``max_abs`` and ``max_rel`` / ``mean_rel`` (error over the magnitude: for a combine, the sum of the absolute
weighted copies of the value; for a dispatch, the token row's largest value; never below 2**-8 of the row's
largest magnitude, where per-block scales flush values). On the CPU the times are the reference backend's:
read the bytes and errors.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from moe_a2a import Buffer
from moe_a2a.formats import logfmt_decode, logfmt_encode, nvfp4_dequantize, nvfp4_quantize
from moe_a2a.fp8 import fp8_to_float, per_token_cast_to_fp8
from moe_a2a.launch import spawn

from .common import commit, run_ranks, time_us, write_report


def _row_bytes(fmt: str, hidden: int) -> int:
    return {"bf16": 2 * hidden, "fp8": hidden + hidden // 128 * 4, "logfmt": hidden * 5 // 4 + hidden // 64 * 4,
            "nvfp4": hidden // 2 + hidden // 16 + 4}[fmt]


def _timed(fn, args, device: torch.device) -> float:
    """Microseconds a call, slowest rank: CUDA events on a GPU (median of ``--loops``), wall clock on the CPU."""
    if device.type == "cuda":
        t = torch.tensor([time_us(fn, args.warmup, args.loops, args.iters)])
    else:
        for _ in range(args.warmup):
            fn()
        start = time.perf_counter()
        for _ in range(args.iters):
            fn()
        t = torch.tensor([(time.perf_counter() - start) / args.iters * 1e6])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _errors(got: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor) -> dict:
    err = (got.float() - ref.float()).abs()
    # Values under 2**-8 of their row's largest magnitude are measured against that floor: formats with a
    # per-block scale flush them (an absolute error far below the row's scale, a relative error of 1).
    magnitude = magnitude.float()
    floor = magnitude.amax(-1, keepdim=True) * 2.0 ** -8 if magnitude.numel() else magnitude
    rel = err / torch.maximum(magnitude, floor).clamp(min=1e-30)
    if not err.numel():
        out = torch.zeros(3)
    else:
        out = torch.stack([err.max(), rel.max(), rel.mean()]).cpu()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return {"max_abs": float(out[0]), "max_rel": float(out[1]), "mean_rel": float(out[2])}


def _body(rank: int, args) -> list:
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    n, hidden, experts, topk, tokens = args.num_ranks, args.hidden, args.experts, args.topk, args.tokens
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16().to(device)
    idx = torch.rand(tokens, experts, generator=gen).topk(topk, dim=1).indices.to(device)
    w = torch.rand(tokens, topk, generator=gen).to(device)
    rows = []

    def row(mode, op, fmt, num_rows, path, t, errs):
        rows.append({"mode": mode, "op": op, "format": fmt, "path": path, "bytes": num_rows * _row_bytes(fmt, hidden),
                     "ratio": _row_bytes(fmt, hidden) / _row_bytes("bf16", hidden), "time_us": t, **errs})

    # ---------------------------------------------------------------- normal mode
    nvl = max(Buffer.get_dispatch_config(n).get_nvl_buffer_size_hint(hidden * 4, n),
              Buffer.get_combine_config(n).get_nvl_buffer_size_hint(hidden * 4, n))
    buffer = Buffer(dist.group.WORLD, nvl, 0, backend=args.backend)
    path = "kernels" if buffer.backend == "cuda" else "reference"
    ntpr, _, ntpe, in_rank, _ = buffer.get_dispatch_layout(idx, experts)
    layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=in_rank, num_tokens_per_expert=ntpe)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=idx, topk_weights=w, **layout)
    sent = int(in_rank.sum())
    nothing = {"max_abs": 0.0, "max_rel": 0.0, "mean_rel": 0.0}
    row_max = recv_x.float().abs().amax(1, keepdim=True).expand_as(recv_x)
    row("normal", "dispatch", "bf16", sent, path, _timed(lambda: buffer.dispatch(x, handle=handle), args, device),
        nothing)
    fp8 = per_token_cast_to_fp8(x)
    got = buffer.dispatch(fp8, handle=handle)[0]
    row("normal", "dispatch", "fp8", sent, path, _timed(lambda: buffer.dispatch(fp8, handle=handle), args, device),
        _errors(fp8_to_float(*got), recv_x, row_max))
    fp4 = nvfp4_quantize(x)
    got = buffer.dispatch(fp4, handle=handle)[0]
    row("normal", "dispatch", "nvfp4", sent, path, _timed(lambda: buffer.dispatch(fp4, handle=handle), args, device),
        _errors(nvfp4_dequantize(*got), recv_x, row_max))
    y = (recv_x.float() * torch.exp2(torch.rand(recv_x.shape, generator=gen) * 4 - 2).to(device)).bfloat16()
    ref, _, _ = buffer.combine(y, handle)
    magnitude, _, _ = buffer.combine(y.abs(), handle)
    num_recv = recv_x.size(0)
    row("normal", "combine", "bf16", num_recv, path, _timed(lambda: buffer.combine(y, handle), args, device), nothing)
    got, _, _ = buffer.combine(y, handle, use_fp8=True)
    row("normal", "combine", "fp8", num_recv, path,
        _timed(lambda: buffer.combine(y, handle, use_fp8=True), args, device), _errors(got, ref, magnitude))

    # ---------------------------------------------------------------- low-latency mode
    ll = Buffer(dist.group.WORLD, 0, Buffer.get_low_latency_rdma_size_hint(tokens, hidden, n, experts),
                low_latency_mode=True, backend=args.backend)
    path = "kernels" if ll.backend == "cuda" else "reference"
    pairs = int((idx >= 0).sum())
    recv, count, ll_handle, _, _ = ll.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False)
    row("low-latency", "dispatch", "bf16", pairs, path,
        _timed(lambda: ll.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False), args, device), nothing)
    got, _, _, _, _ = ll.low_latency_dispatch(x, idx, tokens, experts, use_fp8=True)
    valid = torch.arange(recv.size(1), device=device).view(1, -1) < count.view(-1, 1).to(device)
    decoded = fp8_to_float(got[0].flatten(0, 1), got[1].flatten(0, 1).contiguous())[valid.flatten()]
    ref_rows = recv.flatten(0, 1)[valid.flatten()]
    row("low-latency", "dispatch", "fp8", pairs, path,
        _timed(lambda: ll.low_latency_dispatch(x, idx, tokens, experts, use_fp8=True), args, device),
        _errors(decoded, ref_rows, ref_rows.float().abs().amax(1, keepdim=True).expand_as(ref_rows)))
    # The dispatch above (its handle's routing) again, so the combines below pair with it.
    recv, count, ll_handle, _, _ = ll.low_latency_dispatch(x, idx, tokens, experts, use_fp8=False)
    y = (recv.float() * torch.exp2(torch.rand(recv.shape, generator=gen) * 4 - 2).to(device)).bfloat16()
    ref, _, _ = ll.low_latency_combine(y, idx, w, ll_handle)
    magnitude, _, _ = ll.low_latency_combine(y.abs(), idx, w, ll_handle)
    for fmt, kw in (("bf16", {}), ("fp8", {"use_fp8": True}), ("logfmt", {"use_logfmt": True})):
        got, _, _ = ll.low_latency_combine(y, idx, w, ll_handle, **kw)
        t = _timed(lambda: ll.low_latency_combine(y, idx, w, ll_handle, **kw), args, device)
        row("low-latency", "combine", fmt, int(count.sum()), path, t, _errors(got, ref, magnitude) if kw else nothing)

    # ---------------------------------------------------------------- codecs alone (this rank's rows)
    if rank == 0:
        for fmt, fn in (("fp8", lambda: fp8_to_float(*per_token_cast_to_fp8(y.flatten(0, 1)))),
                        ("logfmt", lambda: logfmt_decode(*logfmt_encode(y.flatten(0, 1)))),
                        ("nvfp4", lambda: nvfp4_dequantize(*nvfp4_quantize(y.flatten(0, 1))))):
            start = time.perf_counter()
            fn()
            rows.append({"mode": "codec", "op": "encode+decode", "format": fmt, "path": "reference", "bytes": 0,
                         "ratio": 0.0, "time_us": (time.perf_counter() - start) * 1e6, "max_abs": 0.0,
                         "max_rel": 0.0, "mean_rel": 0.0})
    return rows


def _rank(rank, num_ranks, args):
    """One rank's rows (rank 0 reports them)."""
    rows = _body(rank, args)
    return rows if rank == 0 else None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("reference", "cuda"), default="reference",
                   help="cuda: the kernels where they have the format (implies --device cuda)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--num-ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--loops", type=int, default=5, help="CUDA timing: the median over this many loops of --iters")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="also write the rows to this file (and a Markdown table beside it)")
    args = p.parse_args(argv)
    if args.hidden % 128 or args.experts % args.num_ranks:
        raise SystemExit("--hidden must be divisible by 128 and --experts by --num-ranks")
    if args.backend == "cuda":
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda / --backend cuda need a CUDA device")
    if args.device == "cuda":
        rows = run_ranks(_rank, args.num_ranks, args)[0]  # ranks share the GPUs under MPS
        where = torch.cuda.get_device_name(0)
    else:
        rows = spawn(_rank, args.num_ranks, args)[0]
        where = "CPU"
    title = (f"{args.num_ranks} ranks on {where} ({args.backend} backend), {args.tokens} tokens/rank, hidden "
             f"{args.hidden}, top-{args.topk} of {args.experts} experts")
    lines = ["| mode | op | format | path | bytes | ratio | time_us | max_abs | max_rel | mean_rel |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['op']} | {r['format']} | {r['path']} | {r['bytes']} | {r['ratio']:.3f} | "
              f"{r['time_us']:.1f} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['mean_rel']:.2e} |" for r in rows]
    print(title)
    print("\n".join(lines))
    if args.json:
        report = {"commit": commit(), "date": time.strftime("%Y-%m-%d"), "device": where,
                  "command": "python -m benchmarks formats " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "args": vars(args), "rows": rows}
        write_report(report, title + "\n\n" + "\n".join(lines), args.json, "Wire formats against BF16")


if __name__ == "__main__":
    main()
