"""`ep-runtime bench`: placeholder until the benchmark issue lands."""
from __future__ import annotations


def main(argv) -> int:
    print("ep-runtime bench: not built yet")
    return 2
