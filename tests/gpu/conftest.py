"""GPU tests share ``tests/dist_utils.py`` and some CPU test bodies (``tests/cpu/test_comm_*.py``) with the CPU
tests: both folders go on the path, so a GPU file also runs on its own (``pytest tests/gpu/test_comm_mixed_gpu.py``)."""
import os
import sys

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _folder in (_TESTS, os.path.join(_TESTS, "cpu")):
    if _folder not in sys.path:
        sys.path.insert(0, _folder)
