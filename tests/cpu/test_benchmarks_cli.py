"""``python -m benchmarks`` and its alias ``python -m moe_a2a bench`` find every benchmark."""
import importlib

import pytest

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
