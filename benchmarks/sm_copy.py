"""The roofline of SM-driven traffic through the intranode mappings: what the kernels' row traffic can reach.

    python -m benchmarks sm-copy --ranks 8 --sms 16 --out docs/perf/sm_copy_ep8_h200.json

Every rank runs the same pattern at once on ``--sms`` blocks (the kernels' launch shape), moving the whole rows
of ``--row-bytes`` in ``--mib`` MiB between a local tensor and the buffers' staging areas
(``IntranodeBackend.copy_probe``):

* ``write own`` / ``read own``: one contiguous slice to / from this rank's own area.
* ``write peer`` / ``read peer``: the same slice to / from the next rank's area, through its mapping.
* ``scatter`` / ``gather``: rows of ``--row-bytes`` (a DeepEP token row by default), one warp per row, row ``i``
  to / from rank ``i % ranks`` (every rank's area, the own one included): the sender-written dispatch's and the
  zero-copy pull's access pattern without their logic.
* ``multicast``: each row read once and written to ``--fanout`` ranks' areas (rank ``i % ranks`` and the next
  ones), packed per source rank as the dispatch's receive rows are: the sender-written dispatch's fan-out (a
  token reaches 5.25 of 8 ranks at top-8 of 256).
* ``reduce``: each row summed (BF16 channels, float32) over the ``--fanout`` copies ``multicast`` left and
  written here: the zero-copy combine's fan-in.
* ``copy engine``: each rank copies its slice within its own memory with the copy engine, all ranks at once.

The rate is every rank's bytes read plus written over the slowest rank's median time. ``x floor`` divides the
time by the copy engine's time for the same bytes read plus written (the floor of ``benchmarks intranode``,
one copy of all ranks' slices, scaled by the pattern's bytes), so the kernels' ``x floor`` figures can be read
against what SM traffic through the same mappings costs. Every pattern's result is checked against the bytes
it should have moved before the next one runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Dict, List

import torch
import torch.distributed as dist

from .common import commit, copy_floor_us, gather, run_ranks, time_us, write_report

# (name, probe pattern or None for the copy engine, whether the peer is the next rank)
PATTERNS = (("write own", "write", False), ("read own", "read", False), ("write peer", "write", True),
            ("read peer", "read", True), ("scatter", "scatter", False), ("gather", "gather", False),
            ("multicast", "multicast", False), ("reduce", "reduce", False), ("copy engine", None, False))


def _words(rank: int, nbytes: int, device) -> torch.Tensor:
    """``nbytes`` of rank-specific, position-dependent int32 words (never zero-filled: a missed copy shows),
    each 16-bit half a finite BF16 value (sign and top exponent bit clear), so ``reduce`` sums numbers."""
    i = torch.arange(nbytes // 4, dtype=torch.int64, device=device)
    return (((i * 1000003 + rank * 7919 + 1) % (2 ** 31 - 1)) & 0x3FFF3FFF).to(torch.int32)


def _moved(pattern: str, fanout: int) -> int:
    """Bytes read plus written per byte of the slice."""
    return 1 + fanout if pattern in ("multicast", "reduce") else 2


def _slice_bytes(args) -> int:
    """Bytes each rank moves: the whole rows of ``--row-bytes`` in ``--mib`` MiB."""
    return (args.mib << 20) // args.row_bytes * args.row_bytes


def _check(name: str, rank: int, num_ranks: int, args, staging: torch.Tensor, out: torch.Tensor) -> None:
    """Raise unless the pattern just run moved the right bytes (this rank's area or its output)."""
    nbytes, row = _slice_bytes(args), args.row_bytes
    words = nbytes // 4
    if name == "write own":
        got, want = staging[rank * words:(rank + 1) * words], _words(rank, nbytes, out.device)
    elif name == "write peer":
        src = (rank - 1) % num_ranks
        got, want = staging[src * words:(src + 1) * words], _words(src, nbytes, out.device)
    elif name == "scatter":
        rows, rw = nbytes // row, row // 4
        per = -(-rows // num_ranks)
        got = torch.cat([staging[s * per * rw:].view(-1)[:len(range(rank, rows, num_ranks)) * rw]
                         for s in range(num_ranks)])
        want = torch.cat([_words(s, nbytes, out.device).view(rows, rw)[rank::num_ranks].reshape(-1)
                          for s in range(num_ranks)])
    elif name == "multicast":  # source s's row i is here, at row (i // R) * fanout + j of s's region, where
        # this rank is (i + j) % R, j < fanout
        rows, rw = nbytes // row, row // 4
        region = -(-rows // num_ranks) * args.fanout
        mine = [i for i in range(rows) if (rank - i) % num_ranks < args.fanout]
        at = [i // num_ranks * args.fanout + (rank - i) % num_ranks for i in mine]
        got = torch.cat([staging[s * region * rw:(s + 1) * region * rw].view(region, rw)[at] for s in range(num_ranks)])
        want = torch.cat([_words(s, nbytes, out.device).view(rows, rw)[mine] for s in range(num_ranks)])
    elif name == "reduce":  # fanout identical copies of this rank's rows, summed exactly in float32
        got = out
        x = _words(rank, nbytes, out.device).view(torch.bfloat16)
        want = (x.float() * args.fanout).to(torch.bfloat16).view(torch.int32)
    elif name in ("read own", "read peer", "gather"):  # each reads back what this rank wrote before
        got, want = out, _words(rank, nbytes, out.device)
    else:
        return
    if not torch.equal(got, want):
        bad = int((got != want).sum())
        raise RuntimeError(f"sm-copy {name}: rank {rank} found {bad} of {want.numel()} words wrong")


def _rank(rank: int, num_ranks: int, args) -> List[Dict]:
    from moe_a2a.backends import intranode

    device = torch.device("cuda", torch.cuda.current_device())
    nbytes = _slice_bytes(args)
    rows = nbytes // args.row_bytes
    area = -(-rows // num_ranks) * num_ranks * args.row_bytes * num_ranks  # the most any pattern needs
    kern = intranode.IntranodeBackend(rank, num_ranks, dist.group.WORLD, area, gather, 60.0)
    staging = kern.get_local_buffer_tensor(torch.int32)
    src = _words(rank, nbytes, device)
    out = torch.zeros_like(src)
    ce_dst = torch.empty_like(src)
    floor = copy_floor_us(nbytes * num_ranks) if rank == 0 else 0.0
    nxt = (rank + 1) % num_ranks
    results = []
    for name, pattern, to_next in PATTERNS:
        if pattern is None:
            fn = lambda: ce_dst.copy_(src)  # noqa: E731
        else:
            local = src if pattern in ("write", "scatter", "multicast") else out
            peer = nxt if to_next else rank
            fn = lambda local=local, pattern=pattern, peer=peer: kern.copy_probe(  # noqa: E731
                local, pattern, peer=peer, row_bytes=args.row_bytes, num_sms=args.sms, fanout=args.fanout)
        out.zero_()
        us = time_us(fn, args.warmup, args.loops, args.iters)
        torch.cuda.synchronize()
        dist.barrier()  # every rank's writes landed before anyone checks its area
        _check(name, rank, num_ranks, args, staging, out)
        dist.barrier()  # every rank checked before the next pattern overwrites the areas
        slowest = max(gather(us))
        moved = _moved(pattern, args.fanout)
        results.append(dict(pattern=name, time_us=round(slowest, 1), bytes_factor=moved,
                            rate_tbps=round(moved * nbytes * num_ranks / slowest / 1e6, 3)))
    floor = max(gather(floor))
    for r in results:
        r["floor_us"] = round(floor * r["bytes_factor"] / 2, 1)
        r["x_floor"] = round(r["time_us"] / r["floor_us"], 3)
    kern.destroy()
    return results


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--sms", type=int, default=16, help="blocks (SMs) per rank")
    p.add_argument("--mib", type=int, default=64, help="MiB each rank moves per call")
    p.add_argument("--row-bytes", type=int, default=14336, help="row size of the row patterns (BF16 hidden 7168)")
    p.add_argument("--fanout", type=int, default=None,
                   help="ranks each row goes to / comes from in multicast / reduce (default: 5, at most --ranks)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loops", type=int, default=5)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--out", default="docs/perf/sm_copy.json")
    args = p.parse_args(argv)
    if args.ranks < 2 or args.sms < 1 or args.mib < 1:
        raise SystemExit("need --ranks >= 2, --sms >= 1, --mib >= 1")
    if args.row_bytes <= 0 or args.row_bytes % 16 or args.row_bytes > args.mib << 20:
        raise SystemExit("--row-bytes must be a positive multiple of 16, at most --mib MiB")
    if args.fanout is None:
        args.fanout = min(5, args.ranks)
    if not 1 <= args.fanout <= args.ranks:
        raise SystemExit("--fanout must be in [1, --ranks]")
    if not torch.cuda.is_available():
        raise SystemExit("sm-copy needs a CUDA device")
    results = run_ranks(_rank, args.ranks, args)[0]
    device = torch.cuda.get_device_name(0)
    shared = args.ranks > torch.cuda.device_count()
    lines = ["| pattern | time (us) | read + written (TB/s) | floor (us) | x floor |", "|---|---|---|---|---|"]
    lines += [f"| {r['pattern']} | {r['time_us']} | {r['rate_tbps']} | {r['floor_us']} | {r['x_floor']} |"
              for r in results]
    table = (f"{args.ranks} ranks ({'sharing the GPU under MPS' if shared else 'one per GPU'}), {args.sms} SMs "
             f"each, {args.mib} MiB per rank, rows of {args.row_bytes} bytes, fan-out {args.fanout}\n\n"
             + "\n".join(lines))
    print(table)
    report = dict(benchmark="sm-copy", device=device, num_gpus=torch.cuda.device_count(), commit=commit(),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  command="python -m benchmarks sm-copy " + " ".join(argv if argv is not None else sys.argv[1:]),
                  args=vars(args), results=results)
    write_report(report, table, args.out, f"SM copy through the intranode mappings on {device}")
    return report


if __name__ == "__main__":
    main()
