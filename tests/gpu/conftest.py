"""GPU tests share ``tests/dist_utils.py`` with the CPU tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
