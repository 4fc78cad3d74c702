"""Runner backends vs the torch runner on one rank: `ep-runtime bench --suite runner` with extra arguments.

    python benchmarks/bench_runner.py --preset mixtral-8x7b --runner-ep-size 1 --cuda-graph --plot runner.png
"""
import sys

from ep_runtime.bench import main

if __name__ == "__main__":
    sys.exit(main(["--suite", "runner", *sys.argv[1:]]))
