"""Performance configs for the normal (high-throughput) kernels and the buffer size hints.

A ``Config`` says how many SMs a kernel may use and how many tokens are staged per chunk in the NVLink
(``num_nvl_bytes``) and RDMA (``num_rdma_bytes``) buffers. The size hints say how large those buffers
should be for a config, so ``Buffer(group, num_nvl_bytes=hint, ...)`` fits the kernels.

The intranode kernels read only ``num_sms``: they stage rows in the buffer in rounds sized by
``num_nvl_bytes`` (any buffer that holds one row per rank works; a larger one needs fewer rounds),
so the chunk fields matter there only through the size hint. The chunk tables below keep
DeepEP's values per world size, so buffers sized from them match what DeepEP users allocate.
"""
from __future__ import annotations

from dataclasses import dataclass

from .limits import MAX_NVL_PEERS

#: Top-k columns the size hints budget for each buffered token (DeepSeek-V3 and Qwen3 use 8). A sizing
#: assumption, not a limit: the kernels take up to ``limits.MAX_TOPK`` columns and fit their rounds to the
#: real top-k and the buffer they were given, so a wider top-k only moves fewer tokens per round.
SIZE_HINT_TOPK = 16
#: Channels of the FP8 scales: one float32 scale per 128 hidden elements.
FP8_SCALE_BLOCK = 128
#: Bytes of each per-channel counter (head, tail, start, end) in the ring buffers.
COUNTER_BYTES = 4
_ALIGN = 128
#: Flags of the low-latency kernels: two sets of dispatch and combine flags (2048 int32 each), then two sets
#: of call signatures (four int32 for each of up to 1024 source ranks).
LOW_LATENCY_SIGNAL_BYTES = 2 * 2048 * 4 + 2 * 1024 * 4 * 4


def _align(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


def _bytes_per_buffered_token(hidden_bytes: int) -> int:
    """Bytes one token occupies in a ring buffer: data, source index, top-k ids/weights, FP8 scales."""
    num_scales = max(1, hidden_bytes // (2 * FP8_SCALE_BLOCK))  # hidden // 128 for BF16-sized rows
    return hidden_bytes + 4 + SIZE_HINT_TOPK * (8 + 4) + num_scales * 4


@dataclass(frozen=True)
class Config:
    """Resources and chunking of one normal-mode kernel launch (DeepEP's ``Config``).

    Attributes:
        num_sms: SMs the kernel uses; must be even (a sender/receiver pair of blocks per channel).
        num_max_nvl_chunked_send_tokens: tokens a sender writes before publishing its tail.
        num_max_nvl_chunked_recv_tokens: ring-buffer capacity per (channel, peer) in tokens.
        num_max_rdma_chunked_send_tokens: like the NVL one, for the RDMA stage of internode kernels.
        num_max_rdma_chunked_recv_tokens: like the NVL one, for the RDMA stage of internode kernels.
    """

    num_sms: int = 20
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self):
        for name, value in self.__dict__.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive int, got {value!r}")
        if self.num_sms % 2 != 0:
            raise ValueError(f"Config.num_sms must be even (two blocks per channel), got {self.num_sms}")
        if self.num_max_nvl_chunked_send_tokens > self.num_max_nvl_chunked_recv_tokens:
            raise ValueError(
                "Config.num_max_nvl_chunked_send_tokens must not exceed num_max_nvl_chunked_recv_tokens, got "
                f"{self.num_max_nvl_chunked_send_tokens} > {self.num_max_nvl_chunked_recv_tokens}")
        if self.num_max_rdma_chunked_send_tokens > self.num_max_rdma_chunked_recv_tokens:
            raise ValueError(
                "Config.num_max_rdma_chunked_send_tokens must not exceed num_max_rdma_chunked_recv_tokens, got "
                f"{self.num_max_rdma_chunked_send_tokens} > {self.num_max_rdma_chunked_recv_tokens}")

    @property
    def num_channels(self) -> int:
        """Channels the tokens of one rank are split into (one SM pair each)."""
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, num_recv_tokens: int = 0,
                                 num_topk: int = 0) -> int:
        """Bytes of NVLink buffer for rows of ``hidden_bytes`` and ``num_ranks`` ranks: the counters and
        ``num_max_nvl_chunked_recv_tokens`` rows per channel and peer.

        A buffer of this size serves dispatch and combine alike, whatever config each uses (the quick start
        sizes the buffer from the dispatch config and runs both): the kernels stage rows in rounds sized by
        ``num_nvl_bytes``, so any buffer of at least ``min_nvl_buffer_bytes`` works (``Buffer`` refuses less)
        and this hint, far above that floor, needs few rounds.

        With ``num_recv_tokens`` (rows a rank receives, e.g. the worst case ``num_tokens * num_ranks``), also
        room for ``Buffer.get_next_combine_buffer``: that many BF16 rows of ``hidden_bytes`` written in place
        plus ``num_topk`` float32 weights each (``combine_input_bytes``).
        """
        _check_positive(hidden_bytes=hidden_bytes, num_ranks=num_ranks)
        return max(self._ring_bytes(hidden_bytes, num_ranks), combine_input_bytes(num_recv_tokens, hidden_bytes,
                                                                                  num_topk))

    def _ring_bytes(self, hidden_bytes: int, num_ranks: int) -> int:
        num_nvl_ranks = min(num_ranks, MAX_NVL_PEERS)
        # Counters: start/end/head/tail per (channel, peer), plus the rank and expert prefix matrices.
        counters = num_nvl_ranks * (num_nvl_ranks + 1) * COUNTER_BYTES
        counters += num_nvl_ranks * 4 * self.num_channels * COUNTER_BYTES
        counters += num_nvl_ranks * 256 * COUNTER_BYTES  # per-expert counts, up to 256 local experts
        ring = self.num_channels * num_nvl_ranks * self.num_max_nvl_chunked_recv_tokens
        return _align(counters) + _align(ring * _bytes_per_buffered_token(hidden_bytes))

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int,
                                  num_ranks_per_node: int = MAX_NVL_PEERS) -> int:
        """Bytes of RDMA buffer the internode kernels need; 0 when the group fits in one node.

        The internode kernels move rows in rounds through a send and a receive area of
        ``num_nodes * window`` slots each (one slot per node and position); this hint gives a window of
        ``num_channels * num_max_rdma_chunked_recv_tokens`` rows. Any buffer that holds one slot per node
        and direction works; a smaller one needs more rounds. ``num_ranks_per_node`` sets the node size
        (lower for virtual nodes in tests).
        """
        _check_positive(hidden_bytes=hidden_bytes, num_ranks=num_ranks, num_ranks_per_node=num_ranks_per_node)
        if num_ranks <= num_ranks_per_node:
            return 0
        num_rdma_ranks = (num_ranks + num_ranks_per_node - 1) // num_ranks_per_node
        window = self.num_channels * self.num_max_rdma_chunked_recv_tokens
        return _align(2 * num_rdma_ranks * window * _rdma_slot_bytes(hidden_bytes))


def min_nvl_buffer_bytes(hidden_bytes: int, num_ranks: int, num_sms: int) -> int:
    """The least ``num_nvl_bytes`` a normal-mode call of ``num_sms`` SMs works with: the counters and one
    buffered row per peer (the kernels then run one round per row). ``Buffer`` refuses smaller buffers; every
    ``get_nvl_buffer_size_hint`` is far above this."""
    _check_positive(hidden_bytes=hidden_bytes, num_ranks=num_ranks, num_sms=num_sms)
    num_nvl_ranks = min(num_ranks, MAX_NVL_PEERS)
    floor = Config(num_sms=max(2, num_sms // 2 * 2), num_max_nvl_chunked_send_tokens=1,
                   num_max_nvl_chunked_recv_tokens=1)
    counters = floor._ring_bytes(hidden_bytes, num_ranks) - _align(floor.num_channels * num_nvl_ranks *
                                                                   _bytes_per_buffered_token(hidden_bytes))
    return counters + _align(num_nvl_ranks * _bytes_per_buffered_token(hidden_bytes))


def combine_input_bytes(num_recv_tokens: int, hidden_bytes: int, num_topk: int = 0) -> int:
    """Bytes of ``num_nvl_bytes`` a zero-copy combine input takes (``Buffer.get_next_combine_buffer``).

    The rows ``[num_recv_tokens, hidden]`` BF16 (``hidden_bytes`` each) written in place, then the
    ``[num_recv_tokens, num_topk]`` float32 ``topk_weights`` the combine copies behind them, each part
    rounded up to 16 bytes.
    """
    for name, value in (("num_recv_tokens", num_recv_tokens), ("hidden_bytes", hidden_bytes),
                        ("num_topk", num_topk)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return _align(num_recv_tokens * hidden_bytes, 16) + _align(num_recv_tokens * num_topk * 4, 16)


def _rdma_slot_bytes(hidden_bytes: int) -> int:
    """Bytes of one RDMA slot: the row, FP8 scales, top-k ids and weights, source index and node mask."""
    num_scales = max(1, hidden_bytes // (2 * FP8_SCALE_BLOCK))
    return (_align(hidden_bytes, 16) + _align(num_scales * 4, 16) + SIZE_HINT_TOPK * (8 + 4)
            + _align(4 + MAX_NVL_PEERS, 16))


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


# Chunking per world size: (nvl send, nvl recv, rdma send, rdma recv); num_sms comes from Buffer.num_sms.
_DISPATCH_CHUNKS = {
    1: (24, 256, 6, 128), 2: (24, 256, 6, 128), 3: (8, 256, 6, 128), 4: (6, 256, 6, 128),
    5: (6, 256, 6, 128), 6: (6, 256, 6, 128), 7: (6, 256, 6, 128), 8: (6, 256, 6, 128),
    16: (36, 288, 20, 128), 24: (8, 288, 32, 128), 32: (32, 288, 32, 128), 64: (20, 288, 28, 128),
    128: (20, 560, 32, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128),
}
_COMBINE_CHUNKS = {
    1: (10, 256, 6, 128), 2: (10, 256, 6, 128), 3: (9, 256, 6, 128), 4: (9, 256, 6, 128),
    5: (6, 256, 6, 128), 6: (6, 256, 6, 128), 7: (4, 256, 6, 128), 8: (4, 256, 6, 128),
    16: (4, 288, 12, 128), 24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 64: (1, 288, 20, 128),
    128: (1, 560, 12, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128),
}


def _lookup(table: dict, num_ranks: int, num_sms: int, what: str) -> Config:
    if num_ranks not in table:
        raise ValueError(f"no {what} config for {num_ranks} ranks; supported: {sorted(table)}")
    return Config(num_sms, *table[num_ranks])


def default_dispatch_config(num_ranks: int, num_sms: int) -> Config:
    """The tuned dispatch config for ``num_ranks`` ranks using ``num_sms`` SMs."""
    return _lookup(_DISPATCH_CHUNKS, num_ranks, num_sms, "dispatch")


def default_combine_config(num_ranks: int, num_sms: int) -> Config:
    """The tuned combine config for ``num_ranks`` ranks using ``num_sms`` SMs."""
    return _lookup(_COMBINE_CHUNKS, num_ranks, num_sms, "combine")


def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                   num_experts: int) -> int:
    """Bytes of buffer the low-latency kernels need (BF16 sizing, two alternating buffer sets).

    With ``E = num_experts`` and ``M = num_max_dispatch_tokens_per_rank``: per-(expert, source) signal
    flags and per-source call signatures (``LOW_LATENCY_SIGNAL_BYTES``), then two sets of a send area
    ``E * M * hidden`` BF16 (also the zero-copy combine input ``[num_local_experts, num_ranks * M, hidden]``)
    and a receive area of ``E * M`` messages, each one BF16 token (or an FP8 token with its scales, which is
    smaller) behind a 16-byte header.
    """
    _check_positive(num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank, hidden=hidden,
                    num_ranks=num_ranks, num_experts=num_experts)
    if num_experts % num_ranks != 0:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by num_ranks ({num_ranks})")
    slots = num_experts * num_max_dispatch_tokens_per_rank
    send = _align(slots * hidden * 2)
    recv = _align(slots * _align(16 + 2 * hidden, 16))
    return LOW_LATENCY_SIGNAL_BYTES + 2 * (send + recv)
