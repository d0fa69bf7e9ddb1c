"""``python -m benchmarks`` and its alias ``python -m moe_a2a bench`` find every benchmark."""
import importlib

import pytest
import torch

from benchmarks import __main__ as bench_cli
from moe_a2a import __main__ as cli


@pytest.mark.parametrize("command", sorted(bench_cli.COMMANDS))
def test_every_command_has_a_main(command):
    module = importlib.import_module(f"benchmarks.{bench_cli.COMMANDS[command][0]}")
    assert callable(module.main)
    with pytest.raises(SystemExit) as info:  # argparse prints the options and exits 0
        module.main(["--help"])
    assert info.value.code == 0


def test_usage_and_unknown_command(capsys):
    assert bench_cli.main([]) == 2
    assert bench_cli.main(["--help"]) == 0
    assert "low-latency" in capsys.readouterr().out
    assert bench_cli.main(["intra"]) == 2
    assert "unknown command 'intra'" in capsys.readouterr().err


def test_moe_a2a_bench_alias(capsys, monkeypatch):
    assert cli.main(["bench", "--help"]) == 0
    assert "python -m moe_a2a bench COMMAND" in capsys.readouterr().out
    # An installed package without the source tree next to it says where the benchmarks are.
    monkeypatch.setattr(cli.os.path, "isfile", lambda path: False)
    assert cli.main(["bench", "intranode"]) == 2
    err = capsys.readouterr().err
    assert "benchmarks ship with the source tree" in err and len(err.strip().splitlines()) == 1


def test_formats_benchmark_on_cpu(tmp_path, capsys):
    """The formats benchmark end to end on 2 CPU ranks (reference backend): every format's row, bytes against
    BF16 as the formats define them, errors within the formats' bounds, and the report names the device."""
    import json

    from benchmarks import formats

    out = tmp_path / "formats.json"
    formats.main(["--num-ranks", "2", "--tokens", "8", "--hidden", "256", "--experts", "4", "--topk", "2",
                  "--iters", "1", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["device"] == "CPU" and (tmp_path / "formats.md").read_text().count("| low-latency |") == 5
    rows = {(r["mode"], r["op"], r["format"]): r for r in report["rows"]}
    assert {k for k in rows if k[0] != "codec"} == {
        ("normal", "dispatch", "bf16"), ("normal", "dispatch", "fp8"), ("normal", "dispatch", "nvfp4"),
        ("normal", "combine", "bf16"), ("normal", "combine", "fp8"), ("low-latency", "dispatch", "bf16"),
        ("low-latency", "dispatch", "fp8"), ("low-latency", "combine", "bf16"), ("low-latency", "combine", "fp8"),
        ("low-latency", "combine", "logfmt")}
    assert rows[("low-latency", "combine", "logfmt")]["ratio"] == pytest.approx(84 / 128)
    assert rows[("normal", "combine", "fp8")]["ratio"] == pytest.approx(132 / 256)
    assert all(r["path"] == "reference" for r in report["rows"])
    assert 0 < rows[("low-latency", "combine", "logfmt")]["max_rel"] < 0.02
    assert 0 < rows[("low-latency", "combine", "fp8")]["max_rel"] < 0.07


@pytest.mark.parametrize("num_ranks, mib, row_bytes, fanout", [(2, 1, 4096, 1), (3, 1, 14336, 2), (8, 2, 14336, 5)])
def test_sm_copy_checks_the_probe_layout(num_ranks, mib, row_bytes, fanout):
    """The sm-copy benchmark's check accepts exactly the layout the probe kernel documents: a write lands at byte
    rank * size of the target's area, scattered row i of a source lands on rank i % R at row
    source * ceil(rows / R) + i // R, multicast row i of a source on ranks (i + j) % R, j < fanout, at row
    source * ceil(rows / R) * fanout + (i // R) * fanout + j (packed per source), and a reduce sums fanout
    copies; one wrong word anywhere is reported."""
    from types import SimpleNamespace

    from benchmarks import sm_copy

    args = SimpleNamespace(mib=mib, row_bytes=row_bytes, fanout=fanout)
    nbytes = sm_copy._slice_bytes(args)
    words, rw, rows = nbytes // 4, row_bytes // 4, nbytes // row_bytes
    per = -(-rows // num_ranks)
    src = [sm_copy._words(s, nbytes, "cpu") for s in range(num_ranks)]
    for rank in range(num_ranks):
        out = torch.zeros(words, dtype=torch.int32)
        written = torch.zeros(num_ranks * max(words, per * rw), dtype=torch.int32)
        written[rank * words:(rank + 1) * words] = src[rank]  # its own write
        prev = (rank - 1) % num_ranks
        written[prev * words:(prev + 1) * words] = src[prev]  # the previous rank's write into this area
        scattered = torch.zeros_like(written)
        for s in range(num_ranks):
            for i in range(rank, rows, num_ranks):
                slot = s * per + i // num_ranks
                scattered[slot * rw:(slot + 1) * rw] = src[s][i * rw:(i + 1) * rw]
        sm_copy._check("write own", rank, num_ranks, args, written, out)
        sm_copy._check("write peer", rank, num_ranks, args, written, out)
        sm_copy._check("scatter", rank, num_ranks, args, scattered, out)
        out.copy_(src[rank])
        sm_copy._check("gather", rank, num_ranks, args, scattered, out)
        scattered[(num_ranks - 1) * per * rw] += 1  # the last source's first row, one word off
        with pytest.raises(RuntimeError, match=f"sm-copy scatter: rank {rank} found 1 of"):
            sm_copy._check("scatter", rank, num_ranks, args, scattered, out)
        out[-1] += 1
        with pytest.raises(RuntimeError, match="sm-copy read peer"):
            sm_copy._check("read peer", rank, num_ranks, args, written, out)
        multicast = torch.zeros(num_ranks * per * fanout * rw, dtype=torch.int32)
        for s in range(num_ranks):
            for i in range(rows):
                for j in range(fanout):
                    if (i + j) % num_ranks == rank:
                        at = (s * per * fanout + i // num_ranks * fanout + j) * rw
                        multicast[at:at + rw] = src[s][i * rw:(i + 1) * rw]
        sm_copy._check("multicast", rank, num_ranks, args, multicast, out)
        bf16 = src[rank].view(torch.bfloat16)
        assert torch.isfinite(bf16).all() and (bf16 != 0).float().mean() > 0.99
        total = torch.zeros(bf16.shape)
        for _ in range(fanout):  # the kernel's float32 sum, one copy at a time
            total += bf16.float()
        out.copy_(total.to(torch.bfloat16).view(torch.int32))
        sm_copy._check("reduce", rank, num_ranks, args, multicast, out)
        j = fanout - 1  # source 0's row (rank - j) % R reaches this rank as its copy j
        multicast[(((rank - j) % num_ranks) // num_ranks * fanout + j) * rw] += 1
        with pytest.raises(RuntimeError, match=f"sm-copy multicast: rank {rank} found 1 of"):
            sm_copy._check("multicast", rank, num_ranks, args, multicast, out)


def test_copy_probe_refuses_an_unknown_pattern():
    """The probe names its patterns before it touches the buffer."""
    from moe_a2a.backends.intranode import PROBE_PATTERNS, IntranodeBackend

    assert set(PROBE_PATTERNS) == {"write", "read", "scatter", "gather", "multicast", "reduce"}
    with pytest.raises(ValueError, match="pattern must be one of .*got 'push'"):
        IntranodeBackend.copy_probe(None, torch.zeros(4), "push")


def test_sm_copy_fanout_defaults_to_the_rank_count_below_five():
    """Two ranks get fan-out 2 by default (the smoke check's shape); an explicit fan-out above the ranks is refused
    before anything runs."""
    from benchmarks import sm_copy

    with pytest.raises(SystemExit, match="--fanout must be in"):
        sm_copy.main(["--ranks", "2", "--fanout", "3"])
    with pytest.raises(SystemExit, match="needs a CUDA device"):  # past the argument checks
        sm_copy.main(["--ranks", "2"])
