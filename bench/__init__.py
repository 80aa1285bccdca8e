"""pytest-benchmark harness: `pytest --benchmark-only` from the repository root."""
import os
import sys


def exec_with_malloc_tunables(module_args: list[str]) -> None:
    """Replace this process by ``python -m MODULE_ARGS`` under vnt's malloc settings
    (``vnt.MALLOC_TUNABLES``, what launch/train.sh sets), unless GLIBC_TUNABLES is already set: then
    return. glibc reads its tunables only at process start."""
    if "GLIBC_TUNABLES" in os.environ:
        return
    from vnt.malloc import MALLOC_TUNABLES
    os.execve(sys.executable, [sys.executable, "-m", *module_args], {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})
