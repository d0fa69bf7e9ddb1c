"""Shared by every test folder (cpu/, megatron/, gpu/): ``dist_utils`` importable as a top-level module,
and the source tree's ``benchmarks`` package importable (appended: an installed moe_a2a still wins)."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)

if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
if _ROOT not in sys.path:
    sys.path.append(_ROOT)
