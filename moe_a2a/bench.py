"""Benchmarks: ``python -m moe_a2a bench intranode [options]``.

Spawns N ranks (sharing GPU 0 under CUDA MPS when there are fewer GPUs than ranks), runs the intranode
kernels on DeepEP's shapes and reports, per shape and SM count:

* ``dispatch``: the dispatch kernel alone (cached mode: same rows, no count exchange);
* ``dispatch_full``: layout + count exchange (host sync) + dispatch, what a first call costs;
* ``combine``: the combine kernel, its input an ordinary tensor (staged into the buffer first);
* ``combine_zero_copy``: the same combine with its input written into the buffer beforehand, outside the
  timed region (``get_next_combine_buffer``, as the expert or un-permute kernel writing it would);
* ``floor``: the copy engine moving the same bytes, measured in the same run; ``x floor`` is the kernel
  time over it. Ranks sharing one GPU: one device-to-device copy of every rank's bytes (they share its
  memory). One rank per GPU: every rank copies, at once, the bytes it sends to each peer straight into
  that peer's memory (one stream per peer), the NVLink roofline;
* ``nccl``: with one rank per GPU, NCCL ``all_to_all_single`` on the same routing with the permutations
  Megatron's ``alltoall`` dispatcher does around it (one row per (token, expert) pair, sorted by expert,
  then chunks sorted by local expert; combine undoes both and sums with the top-k weights), BF16 only;
* ``reference``: the reference backend (``all_to_all_single`` on gloo, CPU tensors) on small shapes.

Bandwidth is counted as DeepEP counts it: bytes a rank receives in dispatch (FP8 rows count their
scales) and sends in combine, over the kernel time (median of timed loops after warm-up, CUDA events).
Writes a JSON (device, commit, command, results) and a Markdown table; ``--plot`` adds a PNG.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_FP8 = getattr(torch, "float8_e4m3fn", None)


# ---------------------------------------------------------------------------- process helpers
@contextlib.contextmanager
def mps_if_needed(num_ranks: int):
    """Start a private CUDA MPS daemon when ranks must share a GPU (kernels of all ranks run together)."""
    if num_ranks <= torch.cuda.device_count() or os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
        yield
        return
    if shutil.which("nvidia-cuda-mps-control") is None:
        raise RuntimeError(f"{num_ranks} ranks on {torch.cuda.device_count()} GPU(s) need CUDA MPS "
                           "(nvidia-cuda-mps-control not found)")
    root = tempfile.mkdtemp(prefix="moe_a2a_mps_")
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=os.path.join(root, "pipe"),
               CUDA_MPS_LOG_DIRECTORY=os.path.join(root, "log"))
    for key in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        os.makedirs(env[key])
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=True)
    saved = {k: os.environ.get(k) for k in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")}
    os.environ.update({k: env[k] for k in saved})  # spawned ranks inherit these and join the daemon
    try:
        yield
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input=b"quit\n", env=env, check=False)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)


def max_num_sms_per_rank(num_ranks: int) -> int:
    """Most SMs per rank such that the blocks of every rank's kernel are resident at once.

    The one-block notify kernels need no room of their own: a rank's dispatch can only get past its
    first barrier after every rank's notify has finished its own barrier.
    """
    ranks_per_gpu = -(-num_ranks // max(1, torch.cuda.device_count()))
    return torch.cuda.get_device_properties(0).multi_processor_count // ranks_per_gpu


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, num_ranks: int, *args):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, num_ranks, port, fn, args, queue)) for r in range(num_ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    out = []
    while not queue.empty():
        out.append(queue.get())
    failed = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"benchmark ranks failed (rank, exit code): {failed}")
    return out


def _rank_main(rank, num_ranks, port, fn, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=num_ranks)
    torch.cuda.set_device(rank % torch.cuda.device_count())
    try:
        result = fn(rank, num_ranks, *args)
        if rank == 0:
            queue.put(result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- timing
def _time_us(fn, warmup: int, loops: int, iters: int) -> float:
    """Median over ``loops`` of the mean time of ``iters`` back-to-back calls, ranks started together."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(loops):
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / iters)
    return statistics.median(samples)


def _copy_floor_us(num_bytes: int, warmup: int = 2, loops: int = 5) -> float:
    """Copy-engine time of ``num_bytes`` device-to-device on this GPU."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    torch.cuda.synchronize()
    samples = []
    for _ in range(loops):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0)
    del src, dst
    return statistics.median(samples)


def _one_rank_per_gpu(num_ranks: int) -> bool:
    return 1 < num_ranks <= torch.cuda.device_count()


def _peer_copy_floor_us(bytes_to: List[int], warmup: int = 2, loops: int = 5) -> float:
    """Time for this rank to copy ``bytes_to[d]`` bytes into GPU ``d``'s memory for every ``d`` at once.

    Called on every rank together (one rank per GPU), so all copies of the group overlap; the result
    is the slowest rank's median. Each peer gets its own stream (the local share is a local copy); CUDA
    events on this rank's GPU bracket them all: a start event every copy stream waits on, and an end
    event recorded once every copy stream is done.
    """
    me = torch.cuda.current_device()
    main = torch.cuda.current_stream()
    pairs = []
    for d, num_bytes in enumerate(bytes_to):
        if num_bytes:
            src = torch.empty(num_bytes, dtype=torch.uint8, device=me)
            dst = torch.empty(num_bytes, dtype=torch.uint8, device=d)
            pairs.append((src, dst, torch.cuda.Stream(device=me)))

    def copy_all() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for src, dst, stream in pairs:
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            main.wait_stream(stream)
        end.record(main)
        end.synchronize()
        return start.elapsed_time(end) * 1000.0

    for _ in range(warmup):
        copy_all()
    samples = []
    for _ in range(loops):
        dist.barrier()
        samples.append(copy_all())
    return max(_gather(statistics.median(samples)))


class _MegatronAllToAll:
    """NCCL all-to-all with the permutations of Megatron's ``alltoall`` token dispatcher (the baseline).

    Dispatch: one row per (token, expert) pair sorted by expert (``permute``), ``all_to_all_single``,
    then the received chunks reordered from (source rank, local expert) to (local expert, source rank).
    Combine: the inverse reorder, ``all_to_all_single`` back, rows scaled by their top-k weight and
    summed into their tokens (``unpermute``). Split sizes are computed once (cached routing).
    """

    def __init__(self, group, topk_idx, topk_weights, num_experts, num_ranks, hidden):
        num_tokens, device = topk_idx.size(0), topk_idx.device
        num_local = num_experts // num_ranks
        # -1 entries go to a spare column that is dropped, so they cannot overwrite a real expert's entry.
        column = torch.where(topk_idx >= 0, topk_idx, num_experts)
        dense = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=device)
        dense = dense.scatter_(1, column, True)[:, :num_experts]
        probs = torch.zeros(num_tokens, num_experts + 1, device=device)
        probs = probs.scatter_(1, column, topk_weights.float())[:, :num_experts]
        self.token_idx = dense.t().nonzero(as_tuple=True)[1]  # expert-major, as Megatron's permute
        self.probs = probs.t()[dense.t()]
        per_expert = dense.sum(0)
        self.input_splits = per_expert.view(num_ranks, num_local).sum(1).tolist()
        recv_counts = torch.empty_like(per_expert)
        dist.all_to_all_single(recv_counts, per_expert, group=group)  # [source rank * local expert]
        recv_counts = recv_counts.view(num_ranks, num_local)
        self.output_splits = recv_counts.sum(1).tolist()
        starts = torch.cumsum(recv_counts.flatten(), 0) - recv_counts.flatten()
        order = torch.arange(num_ranks * num_local, device=device).view(num_ranks, num_local).t().flatten()
        self.chunk_perm = torch.cat([torch.arange(int(starts[c]), int(starts[c] + recv_counts.flatten()[c]),
                                                  device=device) for c in order.tolist()])
        self.chunk_inverse = torch.empty_like(self.chunk_perm)
        self.chunk_inverse[self.chunk_perm] = torch.arange(self.chunk_perm.numel(), device=device)
        self.group, self.num_tokens, self.hidden = group, num_tokens, hidden

    def dispatch(self, x):
        permuted = x.index_select(0, self.token_idx)
        out = x.new_empty(sum(self.output_splits), self.hidden)
        dist.all_to_all_single(out, permuted, self.output_splits, self.input_splits, group=self.group)
        return out.index_select(0, self.chunk_perm)

    def combine(self, y):
        back = y.index_select(0, self.chunk_inverse)
        out = y.new_empty(self.token_idx.numel(), self.hidden)
        dist.all_to_all_single(out, back, self.input_splits, self.output_splits, group=self.group)
        weighted = (out * self.probs.unsqueeze(1)).to(y.dtype)
        return torch.zeros(self.num_tokens, self.hidden, dtype=y.dtype, device=y.device).index_add_(
            0, self.token_idx, weighted)


# ---------------------------------------------------------------------------- intranode
def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _inputs(rank, num_tokens, hidden, num_experts, topk, fp8, device):
    gen = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = torch.randn(num_tokens, hidden, generator=gen).to(device)
    scores = torch.randn(num_tokens, num_experts, generator=gen).abs() + 1  # uniform routing, as DeepEP tests
    topk_idx = scores.topk(topk, dim=1).indices.to(device)
    topk_weights = torch.rand(num_tokens, topk, generator=gen).to(device)
    if fp8:
        amax = x.view(num_tokens, hidden // 128, 128).abs().amax(-1).clamp(min=1e-4)
        scales = amax / 448.0
        xq = (x.view(num_tokens, hidden // 128, 128) / scales.unsqueeze(-1)).view(num_tokens, hidden).to(_FP8)
        return xq, scales.contiguous(), topk_idx, topk_weights
    return x.to(torch.bfloat16), None, topk_idx, topk_weights


def _intranode_worker(rank, num_ranks, opts):
    from .backends import intranode
    from .backends.reference import ReferenceBackend
    from .config import Config

    device = torch.device("cuda", torch.cuda.current_device())
    max_sms = max(opts["sms"])
    hint_cfg = Config(max_sms)
    nvl = max(hint_cfg.get_nvl_buffer_size_hint(max(opts["hidden"]) * 2, num_ranks), opts["min_nvl_bytes"])
    kern = intranode.IntranodeBackend(rank, num_ranks, dist.group.WORLD, nvl, _gather, 60.0)
    ref = ReferenceBackend(rank, num_ranks, dist.group.WORLD, num_ranks)
    num_experts, topk = opts["experts"], opts["topk"]
    w, loops, iters = opts["warmup"], opts["loops"], opts["iters"]
    per_gpu = _one_rank_per_gpu(num_ranks)
    nccl = dist.new_group(backend="nccl") if per_gpu else None
    rows: List[Dict] = []
    for hidden in opts["hidden"]:
        for num_tokens in opts["tokens"]:
            for dtype in opts["dtypes"]:
                fp8 = dtype == "fp8"
                x, scales, idx, weights = _inputs(rank, num_tokens, hidden, num_experts, topk, fp8, device)
                layout = intranode.get_dispatch_layout(idx, num_experts, num_ranks, num_ranks)
                for num_sms in opts["sms"]:
                    cfg = Config(num_sms)
                    row_bytes = _row_bytes(hidden, fp8)
                    handle, mine = _time_kernels(kern, x, scales, idx, weights, layout, num_experts, num_ranks,
                                                 num_ranks, cfg, w, loops, iters, zero_copy=True)
                    everyone = _gather(mine)
                    floors = {}
                    if per_gpu:
                        # Rows this rank sends to each peer: dispatch pushes them there, combine brings them back.
                        send_rows = _gather(layout[0].tolist())
                        floors["dispatch"] = _peer_copy_floor_us([n * row_bytes for n in send_rows[rank]])
                        floors["combine"] = _peer_copy_floor_us([send_rows[d][rank] * hidden * 2
                                                                 for d in range(num_ranks)])
                    elif rank == 0:
                        floors["dispatch"] = _copy_floor_us(sum(m["dispatch_bytes"] for m in everyone))
                        floors["combine"] = _copy_floor_us(sum(m["combine_bytes"] for m in everyone))
                    if per_gpu and not fp8 and num_sms == opts["sms"][0]:
                        floors.update(_time_megatron_alltoall(nccl, x, idx, weights, num_experts, num_ranks,
                                                              w, loops, iters))
                    dist.barrier()
                    ref_us = None
                    if num_tokens <= opts["reference_max_tokens"] and num_sms == opts["sms"][0]:
                        ref_us = _time_reference(ref, rank, num_ranks, x, scales, idx, weights, layout, cfg)
                    if rank == 0:
                        new = _rows(num_ranks, dtype, hidden, num_tokens, num_sms, everyone, floors, ref_us)
                        rows.extend(new)
                        print(_format_rows(new), flush=True)
                    del handle
    kern.destroy()
    return rows


def _row_bytes(hidden: int, fp8: bool) -> int:
    """Bytes of one dispatched row: BF16, or FP8 with its float32 scale per 128 channels."""
    return hidden * (1 if fp8 else 2) + (hidden // 128 * 4 if fp8 else 0)


def _time_kernels(kern, x, scales, idx, weights, layout, num_experts, num_ranks, per_node, cfg, warmup, loops,
                  iters, zero_copy=False):
    """This rank's times (us) of a backend's full dispatch (layout, count exchange and dispatch), cached
    dispatch and combine, on one routing. Returns ``(handle, dict)`` with the received rows and the bytes
    DeepEP counts: received for dispatch, sent back for combine. ``zero_copy``: also the combine of an
    input written into the buffer beforehand (``combine_zero_copy_us``) and the cached dispatch whose senders
    write the rows into the buffer (``dispatch_in_buffer_us``), where they fit on every rank."""
    from .config import combine_input_bytes
    from .backends import intranode

    recv = kern.dispatch(x, scales, None, layout[0], layout[3], layout[2], idx, weights, 1, 0, cfg)
    handle, recv_weights = recv[5], recv[3]
    num_recv, hidden = handle.num_recv_tokens, x.size(1)
    y = torch.randn(num_recv, hidden, device=x.device).to(torch.bfloat16)

    def full():
        lay = intranode.get_dispatch_layout(idx, num_experts, num_ranks, per_node)
        kern.dispatch(x, scales, None, lay[0], lay[3], lay[2], idx, weights, 1, 0, cfg)

    t_full = _time_us(full, warmup, loops, max(1, iters // 2))
    t_disp = _time_us(lambda: kern.dispatch(x, scales, handle, None, None, None, None, None, 1, 0, cfg),
                      warmup, loops, iters)
    t_comb = _time_us(lambda: kern.combine(y, handle, recv_weights, None, None, cfg), warmup, loops, iters)
    times = dict(num_recv=num_recv, dispatch_bytes=num_recv * _row_bytes(hidden, scales is not None),
                 combine_bytes=num_recv * hidden * 2, dispatch_us=t_disp, dispatch_full_us=t_full, combine_us=t_comb)
    if zero_copy and hasattr(kern, "dispatch_receive_rows"):
        room = kern.dispatch_receive_rows(hidden * x.element_size(), scales.size(1) if scales is not None else 0)
        if all(_gather(num_recv <= room)):  # every rank takes the same path
            t = _time_us(lambda: kern.dispatch(x, scales, handle, None, None, None, None, None, 1, 0, cfg,
                                               recv_x_in_buffer=True), warmup, loops, iters)
            times["dispatch_in_buffer_us"] = t
    if zero_copy and combine_input_bytes(num_recv, hidden * 2, idx.size(1)) <= kern.num_nvl_bytes:
        view = kern.get_next_combine_buffer(num_recv, hidden)
        view.copy_(y)  # stays valid over repeated combines: no dispatch runs in between
        times["combine_zero_copy_us"] = _time_us(lambda: kern.combine(view, handle, recv_weights, None, None, cfg),
                                                 warmup, loops, iters)
    return handle, times


def _time_megatron_alltoall(group, x, idx, weights, num_experts, num_ranks, warmup, loops, iters) -> Dict:
    """Slowest rank's dispatch and combine time of the NCCL baseline (``_MegatronAllToAll``)."""
    base = _MegatronAllToAll(group, idx, weights, num_experts, num_ranks, x.size(1))
    y = base.dispatch(x)
    times = dict(nccl_dispatch=_time_us(lambda: base.dispatch(x), warmup, loops, iters),
                 nccl_combine=_time_us(lambda: base.combine(y), warmup, loops, iters))
    return {k: max(v) for k, v in zip(times, zip(*_gather(list(times.values()))))}


def _time_reference(ref, rank, num_ranks, x, scales, idx, weights, layout, cfg) -> float:
    xc = (x.view(torch.uint8) if x.dtype == _FP8 else x).cpu()
    sc = scales.cpu() if scales is not None else None
    lay = [t.cpu() if t is not None else None for t in layout]
    ic, wc = idx.cpu(), weights.cpu()
    samples = []
    for _ in range(3):
        dist.barrier()
        start = time.perf_counter()
        ref.dispatch(xc, sc, None, lay[0], lay[3], lay[2], ic, wc, 1, 0, cfg)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _rows(num_ranks, dtype, hidden, num_tokens, num_sms, everyone, floors, ref_us):
    out = []
    for op, key, bytes_key in (("dispatch", "dispatch_us", "dispatch_bytes"),
                               ("dispatch_full", "dispatch_full_us", "dispatch_bytes"),
                               ("dispatch_in_buffer", "dispatch_in_buffer_us", "dispatch_bytes"),
                               ("combine", "combine_us", "combine_bytes"),
                               ("combine_zero_copy", "combine_zero_copy_us", "combine_bytes")):
        if not all(key in m for m in everyone):  # the zero-copy input did not fit num_nvl_bytes
            continue
        slowest = max(m[key] for m in everyone)
        bw = statistics.mean(m[bytes_key] / m[key] / 1e3 for m in everyone)  # GB/s per rank
        combine = op.startswith("combine")
        floor = floors["combine" if combine else "dispatch"]
        nccl = floors.get("nccl_combine" if combine else "nccl_dispatch")
        out.append(dict(ranks=num_ranks, dtype=dtype, hidden=hidden, tokens=num_tokens, num_sms=num_sms, op=op,
                        time_us=round(slowest, 1), algbw_gbps=round(bw, 1), floor_us=round(floor, 1),
                        x_floor=round(slowest / floor, 3) if floor > 0 else None,
                        nccl_us=round(nccl, 1) if nccl is not None else None,
                        reference_us=round(ref_us, 1) if (ref_us is not None and op == "dispatch") else None,
                        recv_rows_per_rank=[m["num_recv"] for m in everyone]))
    return out


def _format_rows(rows) -> str:
    head = ("| ranks | dtype | hidden | tokens | SMs | op | time (us) | algbw/rank (GB/s) | floor (us) | x floor | "
            "NCCL+permute (us) | reference (us) |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        nccl = r.get("nccl_us")
        lines.append(f"| {r['ranks']} | {r['dtype']} | {r['hidden']} | {r['tokens']} | {r['num_sms']} | {r['op']} | "
                     f"{r['time_us']} | {r['algbw_gbps']} | {r['floor_us']} | {r['x_floor']} | "
                     f"{'' if nccl is None else nccl} | {'' if r['reference_us'] is None else r['reference_us']} |")
    return "\n".join(lines)


def _commit() -> str:
    """The commit measured: ``MOE_A2A_COMMIT`` when set (a copy of the tree whose git metadata is not its
    own), else git's HEAD, with ``+dirty`` when tracked files differ from it."""
    if os.environ.get("MOE_A2A_COMMIT"):
        return os.environ["MOE_A2A_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def plot(rows: List[Dict], path: str) -> None:
    """Bandwidth vs tokens per (ranks, dtype, op) at the largest hidden size and SM count measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hidden = max(r["hidden"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for ranks in sorted({r["ranks"] for r in rows}):
        sms = max(r["num_sms"] for r in rows if r["ranks"] == ranks)
        for dtype in sorted({r["dtype"] for r in rows}):
            for op in ("dispatch", "combine", "combine_zero_copy"):
                pts = sorted((r["tokens"], r["algbw_gbps"]) for r in rows if r["ranks"] == ranks and
                             r["dtype"] == dtype and r["op"] == op and r["hidden"] == hidden and r["num_sms"] == sms)
                if len(pts) > 1:
                    ax.plot(*zip(*pts), marker="o", label=f"EP{ranks} {dtype} {op} ({sms} SMs)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per rank")
    ax.set_ylabel("algorithm bandwidth per rank (GB/s)")
    ax.set_title(f"moe_a2a intranode, hidden {hidden}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(",") if v]


def add_shape_args(p: argparse.ArgumentParser, sms: str, warmup: int, iters: int) -> None:
    """The options every normal-mode benchmark takes: shapes (DeepEP's by default), SM counts, timing."""
    p.add_argument("--tokens", default="4096", help="tokens per rank, comma-separated")
    p.add_argument("--hidden", default="7168")
    p.add_argument("--sms", default=sms, help="SMs per rank; counts that cannot be co-resident are skipped")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--loops", type=int, default=5)
    p.add_argument("--iters", type=int, default=iters)


def write_report(report: Dict, table: str, out: str, title: str) -> None:
    """``report`` as JSON at ``out`` and a Markdown page (title, commit, command, ``table``) next to it."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(f"# {title}\n\ncommit `{report['commit']}`, {report['date']}\n\n`{report['command']}`\n\n{table}\n")


def intranode_main(argv) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_a2a bench intranode", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="8", help="comma-separated rank counts (default 8)")
    add_shape_args(p, sms="8,16,24", warmup=3, iters=6)
    p.add_argument("--reference-max-tokens", type=int, default=512)
    p.add_argument("--min-nvl-bytes", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default docs/perf/intranode_<device>.json)")
    p.add_argument("--plot", action="store_true", help="also write a PNG next to the JSON")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench intranode needs a CUDA device", file=sys.stderr)
        return 2
    from .backends import intranode
    if not intranode.extension_available():
        print("bench intranode needs the compiled extension moe_a2a._C", file=sys.stderr)
        return 2

    all_rows: List[Dict] = []
    for num_ranks in _ints(args.ranks):
        fit = max_num_sms_per_rank(num_ranks)
        sms = [s for s in _ints(args.sms) if s <= fit]
        skipped = [s for s in _ints(args.sms) if s > fit]
        if skipped:
            print(f"EP{num_ranks}: skipping {skipped} SMs per rank (only {fit} fit with every rank resident)")
        if not sms:
            continue
        opts = dict(tokens=_ints(args.tokens), hidden=_ints(args.hidden), sms=sms, dtypes=args.dtypes.split(","),
                    experts=args.experts, topk=args.topk, warmup=args.warmup, loops=args.loops, iters=args.iters,
                    reference_max_tokens=args.reference_max_tokens, min_nvl_bytes=args.min_nvl_bytes)
        with mps_if_needed(num_ranks):
            results = _spawn(_intranode_worker, num_ranks, opts)
        all_rows.extend(results[0])

    device = torch.cuda.get_device_name(0)
    report = dict(device=device, num_gpus=torch.cuda.device_count(), torch=torch.__version__, commit=_commit(),
                  command="python -m moe_a2a bench intranode " + " ".join(argv),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  shared_gpu=torch.cuda.device_count() < max(_ints(args.ranks)),
                  floor="copy engine: one device-to-device copy on the shared GPU, or, with one rank per GPU, "
                        "every rank's peer copies at once (NVLink)", results=all_rows)
    out = args.out or os.path.join("docs", "perf", f"intranode_{device.replace(' ', '_')}.json")
    table = _format_rows(all_rows)
    write_report(report, table, out, f"intranode on {device}")
    if args.plot:
        plot(all_rows, os.path.splitext(out)[0] + ".png")
    print(table)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m moe_a2a bench {intranode,low-latency,internode,moe-layer} [options]   (see: bench intranode --help)")
        return 0 if argv else 2
    if argv[0] == "intranode":
        return intranode_main(argv[1:])
    if argv[0] == "low-latency":
        from . import bench_low_latency
        return int(bench_low_latency.main(argv[1:]) or 0)
    if argv[0] == "internode":
        from . import bench_internode
        return int(bench_internode.main(argv[1:]) or 0)
    if argv[0] == "moe-layer":  # benchmarks/moe_layer.py (run from the repository root)
        from benchmarks import moe_layer
        return int(moe_layer.main(argv[1:]) or 0)
    raise ValueError(f"bench {argv[0]!r}: choose 'intranode', 'low-latency', 'internode' or 'moe-layer'")


if __name__ == "__main__":
    sys.exit(main())
