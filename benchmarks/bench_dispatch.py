"""Dispatchers vs raw all_to_all_single: `ep-runtime bench --suite dispatch` with any extra arguments.

    python benchmarks/bench_dispatch.py                                   # 2 local CPU ranks, tiny preset
    torchrun --nproc-per-node 4 benchmarks/bench_dispatch.py --preset deepseek-v3 --json dispatch.json
"""
import sys

from ep_runtime.bench import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "dispatch", *sys.argv[1:]]))
