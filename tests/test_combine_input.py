"""Size of the zero-copy combine input (``Buffer.get_next_combine_buffer``) and its size hint."""
import pytest

from moe_a2a import Config
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
