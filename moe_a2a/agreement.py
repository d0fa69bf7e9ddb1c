"""What every rank of one collective call must agree on, and the error every rank raises when they do not.

A dispatch or combine is collective: each rank passes its own tensors, and the sizes the ranks exchange
only fit together when they agree on the hidden size, the dtypes, FP8 or not, the number of experts, the
top-k width and, for combine and cached dispatch, which dispatch's handle they pass. A backend packs this
``signature`` (a short list of ints) into an exchange it makes anyway (the reference backend puts it in
front of its count exchange), gathers every rank's list, and calls ``check``: each rank then raises the
same ``ValueError`` naming the disagreeing ranks and their values, before any payload moves.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

#: Operations, by code (the first field of a signature).
OPERATIONS = ("dispatch", "cached dispatch", "combine", "low-latency dispatch", "low-latency combine")
#: Dtypes, by code; 0 means "none" (no tensor passed).
DTYPES = (None, torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e4m3fn, torch.int64,
          torch.int32, torch.uint8, torch.bool)
#: Fields of a signature, in order, with the words the error uses for them.
FIELDS = ("operation", "hidden size", "token dtype", "FP8 scales", "number of experts", "top-k width",
          "top-k weights dtype", "handle epoch", "handle fingerprint", "max tokens per rank")
SIGNATURE_LENGTH = len(FIELDS)


def dtype_code(dtype: Optional[torch.dtype]) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype} has no agreement code; expected one of {DTYPES[1:]}")
    return DTYPES.index(dtype)


def signature(operation: str, hidden: int, dtype: torch.dtype, fp8: bool = False, num_experts: int = 0,
              num_topk: int = -1, weights_dtype: Optional[torch.dtype] = None, handle_identity=None,
              num_max_tokens: int = 0) -> List[int]:
    """The ints ranks compare before ``operation``.

    Arguments:
        operation: one of ``OPERATIONS``.
        hidden: hidden size of the tokens; dtype: their dtype; fp8: whether FP8 scales travel with them.
        num_experts: experts of the group (0 where the call takes none).
        num_topk: width of ``topk_idx`` (-1 where none is passed).
        weights_dtype: dtype of ``topk_weights`` (None where none are passed).
        handle_identity: the ``HandleIdentity`` of the handle passed (combine, cached dispatch), or None.
        num_max_tokens: ``num_max_dispatch_tokens_per_rank`` of low-latency calls (0 otherwise).
    """
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    epoch, fingerprint = (-1, -1) if handle_identity is None else (handle_identity.epoch, handle_identity.fingerprint)
    return [OPERATIONS.index(operation), int(hidden), dtype_code(dtype), int(bool(fp8)), int(num_experts),
            int(num_topk), dtype_code(weights_dtype), int(epoch), int(fingerprint), int(num_max_tokens)]


def _show(field: int, value: int) -> str:
    if field == 0:
        return OPERATIONS[value] if 0 <= value < len(OPERATIONS) else f"operation code {value}"
    if field in (2, 6):
        return str(DTYPES[value]) if 0 <= value < len(DTYPES) else f"dtype code {value}"
    if field == 3:
        return "yes" if value else "no"
    if field == 5 and value < 0:
        return "none (no topk_idx)"
    if field in (7, 8) and value < 0:
        return "none (a handle not made by dispatch)"
    return str(value)


def disagreement(rows: Sequence[Sequence[int]], ranks: Optional[Sequence[int]] = None) -> Optional[str]:
    """Why the ranks' signatures ``rows`` (one per rank) do not fit together, or None if they do.

    ``ranks`` names the rows (default ``0..n-1``). The first field that differs is reported (the operation
    first: other fields of different operations are not comparable).
    """
    ranks = list(range(len(rows))) if ranks is None else list(ranks)
    for field in range(SIGNATURE_LENGTH):
        groups: Dict[int, List[int]] = {}
        for rank, row in zip(ranks, rows):
            groups.setdefault(int(row[field]), []).append(rank)
        if len(groups) > 1:
            parts = "; ".join(f"{'rank' if len(r) == 1 else 'ranks'} {', '.join(map(str, r))}: "
                              f"{_show(field, value)}" for value, r in sorted(groups.items(), key=lambda kv: kv[1]))
            what = OPERATIONS[int(rows[0][0])] if field else "the collective call"
            hint = (" (every rank must pass the handle of the same dispatch)" if field in (7, 8) else
                    " (every rank must make the same call in the same order)" if field == 0 else "")
            return f"ranks disagree on the {FIELDS[field]} of {what}: {parts}{hint}"
    return None


def check(rows: Sequence[Sequence[int]], ranks: Optional[Sequence[int]] = None) -> None:
    """Raise ``ValueError`` (the same on every rank that calls it with the same rows) if they disagree."""
    reason = disagreement(rows, ranks)
    if reason is not None:
        raise ValueError(reason)
