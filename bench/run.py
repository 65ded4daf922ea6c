"""`make bench` / `loraserve bench [WORKLOAD ...]`: run the benchmarks, print tables, write bench/results/."""

from __future__ import annotations

import importlib
import sys

# kernels: CUDA only (says so and returns without one); online, abuse and fairness: a server process and gRPC
# clients; peers: llama.cpp's server on the same file (built once, ~25 minutes on 2 cores, cached under bench/.peers/).
WORKLOADS = ("engine", "multi_lora", "structured", "peers", "online", "kernels", "abuse", "fairness", "fairness_replay",
             "steps", "speculative", "streaming")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a in WORKLOADS for a in argv) and ("-h" in argv or "--help" in argv):
        print("usage: make bench ARGS=\"[WORKLOAD ...] [OPTIONS]\"  (or: loraserve bench [WORKLOAD ...] [OPTIONS])\n\n"
              "Runs the chosen workloads (all of them, in this order, when none is named), each writing "
              "bench/results/WORKLOAD.json:\n  " + " ".join(WORKLOADS) + "\n\nA workload's own options: "
              "make bench ARGS=\"WORKLOAD --help\". How each measures: bench/README.md.")
        return 0
    chosen = [a for a in argv if a in WORKLOADS] or list(WORKLOADS)
    rest = [a for a in argv if a not in WORKLOADS]
    for name in chosen:
        importlib.import_module(f"bench.{name}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
