"""The README's quick-start sizing (the dispatch config's hint) holds both dispatch and combine for 2..8 ranks.

Buffer's own size check runs here for every world size and hidden size; ``test_buffer.py`` dispatches and
combines on 2, 4 and 8 gloo ranks with buffers sized this way, and the demo below on 2.
"""
from types import SimpleNamespace

import pytest
import torch

from moe_a2a import Buffer
from moe_a2a.train.cli import demo as demo_main


@pytest.mark.parametrize("num_ranks", range(2, 9))
@pytest.mark.parametrize("hidden", [128, 2048, 7168])
def test_readme_sizing_passes_the_checks_of_dispatch_and_combine(num_ranks, hidden):
    # The buffer exactly as the README builds it.
    config = Buffer.get_dispatch_config(num_ranks)
    num_nvl_bytes = config.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
    # Buffer's own size check, as dispatch (with its default config) and combine (with its own) run it.
    stub = SimpleNamespace(num_nvl_bytes=num_nvl_bytes, group_size=num_ranks, num_rdma_ranks=1, _kernels=None)
    for op_config in (Buffer.get_dispatch_config(num_ranks), Buffer.get_combine_config(num_ranks)):
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            Buffer._check_buffer_sizes(stub, op_config, torch.empty(1, hidden, dtype=dtype))
    # And a buffer far below it is refused with the hint in the message.
    stub.num_nvl_bytes = hidden
    with pytest.raises(ValueError, match="too small .* size it with Config.get_nvl_buffer_size_hint"):
        Buffer._check_buffer_sizes(stub, Buffer.get_combine_config(num_ranks), torch.empty(1, hidden,
                                                                                              dtype=torch.bfloat16))


def test_demo_two_ranks(capsys):
    # The demo sizes its buffer as the README does, then dispatches and combines on 2 gloo ranks.
    assert demo_main(["--ranks", "2", "--tokens", "24", "--hidden", "256"]) == 0
    assert "results match" in capsys.readouterr().out
