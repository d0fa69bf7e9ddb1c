"""GPU tests share ``tests/dist_utils.py`` with the CPU tests (``tests/conftest.py`` puts ``tests/`` on the
path too; this keeps ``harness`` working when ``tests/gpu`` is given its own root)."""
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
