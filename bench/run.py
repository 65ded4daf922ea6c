"""`make bench` / `loraserve bench [WORKLOAD ...]`: run the benchmarks, print tables, write bench/results/."""

from __future__ import annotations

import sys

WORKLOADS = ("engine", "multi_lora", "kernels")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = [a for a in argv if a in WORKLOADS] or list(WORKLOADS)
    rest = [a for a in argv if a not in WORKLOADS]
    for name in chosen:
        if name == "engine":
            from bench.engine import main as run
        elif name == "multi_lora":
            from bench.multi_lora import main as run
        else:  # kernels: CUDA only (says so and returns without one)
            from bench.kernels import main as run
        run(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
