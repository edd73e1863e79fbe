"""How big the heavy tests run.

`make test` runs each heavy test as a smaller smoke of itself (one CUDA target, fewer trials, fewer
concurrent clients, fewer generated examples); `make test-full` (APPLIANCE_TESTS=full) runs them at
the sizes the issues name. Both run the same assertions.
"""

import os

FULL = os.environ.get("APPLIANCE_TESTS") == "full"


def full_or(full: int, smoke: int) -> int:
    return full if FULL else smoke
