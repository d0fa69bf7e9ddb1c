"""SM counts measured for the intranode kernels, per world size (``python -m benchmarks tune-intranode`` writes them).

``data/intranode_tuning.json`` holds, per number of ranks, the fewest SMs at which dispatch and combine
run within a tolerance of their fastest time, with the times behind the choice and the device, commit and
command of the run. ``Buffer.get_dispatch_config`` / ``get_combine_config`` use no more SMs than that:
more do not make the kernel faster, and the SMs left over run the model. Only runs with one rank per GPU
are recorded: ranks sharing one GPU do not see NVLink's latency, so their SM needs differ.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Dict, Optional

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "intranode_tuning.json")


def load_table(path: Optional[str] = None) -> Dict:
    """The tuning table at ``path`` (default ``TABLE_PATH``), or an empty one when none was measured."""
    return read_table(path or TABLE_PATH)


@functools.lru_cache(maxsize=None)
def read_table(path: str) -> Dict:
    """A measured table (JSON with an ``entries`` map) read once per path; ``{"entries": {}}`` where the file
    does not exist. Serves this module's SM table and ``moe_a2a.comm``'s all-reduce strategy table."""
    if not os.path.isfile(path):
        return {"entries": {}}
    with open(path) as f:
        return json.load(f)


def choose(times_us: Dict[int, float], tolerance: float) -> int:
    """Fewest SMs whose time is within ``tolerance`` of the fastest (``times_us``: SM count -> us)."""
    best = min(times_us.values())
    return min(sms for sms, t in times_us.items() if t <= best * (1 + tolerance))


def tuned_num_sms(op: str, num_ranks: int) -> Optional[int]:
    """Fewest SMs at which ``op`` ("dispatch" or "combine") ran at full speed with ``num_ranks`` ranks."""
    if op not in ("dispatch", "combine"):
        raise ValueError(f"op must be 'dispatch' or 'combine', got {op!r}")
    entry = load_table()["entries"].get(str(num_ranks))
    return None if entry is None else int(entry[op])
