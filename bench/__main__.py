"""Command line entry: ``python -m bench COMMAND [options]``, or the console script
``shampoo-bench COMMAND [options]`` that installing the package adds."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = "python -m bench" if script in ("", "__main__.py", "-c") else script
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
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
