"""The host side of the kernels' call comparison: the low-latency error record's text (field, both ranks,
both values, the operation), and the buffer sizes that hold the signatures, alike in Python and C++.

The kernels themselves (a rank whose call differs stops every rank that compares with it) are tested on GPUs:
``tests/gpu/test_low_latency.py``, ``test_internode_low_latency.py`` and ``test_internode.py``
(``test_ranks_that_disagree_are_told``).
"""
import pytest

from moe_a2a import config
from moe_a2a.backends import low_latency

#: (code, phase, peer, index, set, call, mine, theirs), as ``error_record()`` returns it.
MISMATCH, DISPATCH, COMBINE = 2, 1, 2


def test_a_mismatch_names_the_field_both_ranks_and_both_values():
    text = low_latency.error_text((MISMATCH, DISPATCH, 3, 0, 1, 7, 256, 512), 0, 10.0)
    assert text == ("rank 0 and rank 3 disagree on the hidden size of low-latency dispatch (call 7, buffer set 1): "
                    "rank 0 has 256, rank 3 has 512 (every rank must make the same call in the same order)")
    text = low_latency.error_text((MISMATCH, DISPATCH, 0, 1, 0, 2, 128, 64), 5, 10.0)
    assert "rank 5 and rank 0 disagree on the tokens per rank (num_max_dispatch_tokens_per_rank) of " \
           "low-latency dispatch" in text and "rank 5 has 128, rank 0 has 64" in text
    text = low_latency.error_text((MISMATCH, COMBINE, 1, 2, 0, 4, 64, 32), 2, 10.0)
    assert "disagree on the number of experts of low-latency combine" in text and "rank 2 has 64, rank 1 has 32" in text


def test_wire_formats_are_named():
    text = low_latency.error_text((MISMATCH, DISPATCH, 1, 3, 1, 1, 1, 3), 0, 10.0)
    assert "disagree on the wire format of low-latency dispatch" in text
    assert "rank 0 has BF16 dispatch, rank 1 has FP8 dispatch with power-of-two scales (round_scale)" in text
    text = low_latency.error_text((MISMATCH, COMBINE, 0, 3, 0, 9, 4, 99), 1, 10.0)
    assert "rank 1 has BF16 combine, rank 0 has format code 99" in text


def test_combine_formats_are_named_as_the_kernels_number_them():
    import os
    import re
    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")
    if not os.path.isdir(csrc):
        pytest.skip("no csrc/ beside the tests (an installed package)")
    with open(os.path.join(csrc, "kernels", "low_latency.cuh")) as f:
        enum = dict((name, int(v)) for name, v in re.findall(r"kLLFormat(\w+) = (\d+)", f.read()))
    assert sorted(low_latency.WIRE_FORMATS) == sorted(enum.values())
    for name, code in enum.items():  # "FP8RoundDispatch" -> "fp8 dispatch", the first words of the Python name
        words = re.sub(r"(Dispatch|Combine)$", r" \1", name.replace("Round", "")).lower()
        assert low_latency.WIRE_FORMATS[code].lower().startswith(words), (code, name)
    text = low_latency.error_text((MISMATCH, COMBINE, 1, 3, 0, 2, 6, 4), 0, 10.0)
    assert "rank 0 has LogFMT combine, rank 1 has BF16 combine" in text
    assert "rank 0 has FP8 combine" in low_latency.error_text((MISMATCH, COMBINE, 1, 3, 0, 2, 5, 6), 0, 10.0)


def test_timeouts_and_no_error_read_as_before():
    assert low_latency.error_text((0, 0, 0, 0, 0, 0, 0, 0), 0, 1.0) == ""
    assert low_latency.error_text((1, COMBINE, 1, 5, 0, 3, 0, 0), 0, 1.5) == (
        "rank 0 timed out after 1.5 s in low-latency combine receive (call 3, buffer set 0) waiting for rank 1's "
        "expert outputs (tag 5)")


def test_the_size_hint_holds_the_signatures():
    # Flags (two sets of 2048 int32), then four int32 per source rank (up to 1024) and set.
    assert config.LOW_LATENCY_SIGNAL_BYTES == 2 * 2048 * 4 + 2 * 1024 * 16
    m, hidden, experts = 128, 7168, 256
    area = lambda n: -(-n // 128) * 128  # noqa: E731
    assert config.get_low_latency_rdma_size_hint(m, hidden, 8, experts) == config.LOW_LATENCY_SIGNAL_BYTES + 2 * (
        area(experts * m * hidden * 2) + area(experts * m * (16 + 2 * hidden)))


def test_the_extension_sizes_the_buffer_as_python_does():
    if not low_latency.available():
        pytest.skip("moe_a2a._C has no low-latency kernels")
    for shape in ((128, 7168, 8, 256), (32, 7168, 8, 288), (1, 128, 2, 2)):
        assert low_latency._C.LowLatencyRuntime.required_bytes(*shape) == config.get_low_latency_rdma_size_hint(*shape)
