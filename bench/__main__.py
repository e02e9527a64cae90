"""Command line entry: ``python -m bench demo [options]``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import adapters, demo, gpu, memory, pipeline, roots, step

    demo.add_arguments(sub.add_parser("demo", help="train the digits autoencoder with each optimizer"))
    adapters.add_arguments(sub.add_parser("adapters", help="per-step cost of each adapter vs the core"))
    roots.add_arguments(sub.add_parser("roots", help="inverse p-th root methods vs the matmul floor"))
    step.add_arguments(sub.add_parser("step", help="optimizer step time vs its FLOP floor"))
    pipeline.add_arguments(sub.add_parser("pipeline", help="asynchronous roots vs none vs synchronous"))
    gpu.add_arguments(sub.add_parser("gpu", help="roots, batched eigh and host roots on accelerator arrays"))
    memory.add_arguments(sub.add_parser("memory", help="optimizer state bytes per parameter"))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
