"""A benchmark process's own peak memory."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: the kernel's high-water mark of its own address space
    (``VmHWM``). ``ru_maxrss`` is not: it also keeps the RSS of the process that forked this
    one, as it was at the fork (a benchmark's parent holds models, inputs and outputs)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (KiB on Linux)
