"""The zero-copy combine input (``Buffer.get_next_combine_buffer``): its size, size hint and recognition."""
import pytest
import torch

from moe_a2a import Config
from moe_a2a.backends.intranode import is_combine_input_view, start_address
from moe_a2a.config import combine_input_bytes


def test_combine_input_bytes_and_hint():
    # Rows, then weights, each rounded up to 16 bytes: the layout the intranode combine reads.
    assert combine_input_bytes(0, 7168 * 2) == 0
    assert combine_input_bytes(3, 7168 * 2) == 3 * 7168 * 2
    assert combine_input_bytes(3, 7168 * 2, num_topk=1) == 3 * 7168 * 2 + 16
    assert combine_input_bytes(5, 24, num_topk=8) == 128 + 160
    config = Config(16)
    ring = config.get_nvl_buffer_size_hint(7168 * 2, 8)
    assert config.get_nvl_buffer_size_hint(7168 * 2, 8, num_recv_tokens=16) == ring  # the ring is larger
    worst = 4096 * 8
    assert config.get_nvl_buffer_size_hint(7168 * 2, 8, num_recv_tokens=worst, num_topk=8) == \
        combine_input_bytes(worst, 7168 * 2, 8) > ring
    with pytest.raises(ValueError, match="num_recv_tokens must be an int >= 0, got -1"):
        config.get_nvl_buffer_size_hint(7168 * 2, 8, num_recv_tokens=-1)


def test_empty_combine_input_is_recognised():
    # data_ptr() is 0 for an empty tensor, and the zero-copy input of a rank that received no rows is
    # one: the intranode backend must still tell it from other inputs, or that rank alone would take a
    # stale view as an ordinary input and communicate where its peers raise.
    raw = torch.empty(1024, dtype=torch.uint8)  # stands for the staging area
    start = raw.data_ptr()
    for rows in (0, 3):
        view = raw[:rows * 16 * 2].view(torch.bfloat16).view(rows, 16)  # what get_next_combine_buffer returns
        assert start_address(view) == raw.data_ptr()
        assert is_combine_input_view(view, start, rows)
        assert not is_combine_input_view(view, start, rows + 1)
        assert not is_combine_input_view(torch.zeros(rows, 16, dtype=torch.bfloat16), start, rows)
    assert torch.empty(0, 16).data_ptr() == 0 == raw[:0].data_ptr()  # why data_ptr() cannot tell them apart
    assert start_address(raw[32:].view(torch.bfloat16)[:0]) == raw.data_ptr() + 32
    assert not is_combine_input_view(raw[32:32 + 3 * 32].view(torch.bfloat16).view(3, 16), start, 3)
