"""Real servers for integration tests and benchmarks, here and in your own: `monaserve serve` as a
process, nginx in front of several, test images, the server's container image built and run with podman
(`monaserve.testing.images`), and a launcher that makes functions fail inside a
server (`python -m monaserve.testing.faults`)."""

import sys

from .nginx import Nginx, find_tool
from .processes import MONASERVE, TOKEN, ServerProcess, free_port, image_bytes

FAULTS = [sys.executable, "-m", "monaserve.testing.faults"]
"""The command prefix that runs a server with functions patched to raise or to wait (see `faults.py`)."""

__all__ = ["FAULTS", "MONASERVE", "TOKEN", "Nginx", "ServerProcess", "find_tool", "free_port", "image_bytes"]
