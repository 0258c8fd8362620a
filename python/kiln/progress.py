"""Progress bars on a terminal, silence when piped; ``KILN_LOG=area,...`` per-area logs."""
from __future__ import annotations

import logging
import sys

from .options import settings

AREAS = ("frontend", "passes", "tune", "codegen", "runtime", "bench")


def progress(iterable=None, total=None, desc: str = "", unit: str = "it"):
    """A tqdm bar on an interactive stderr; the plain iterable otherwise."""
    if not sys.stderr.isatty() or not settings().progress:
        return iterable if iterable is not None else _Null()
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr)


class _Null:
    def update(self, n=1):
        pass

    def close(self):
        pass

    def set_description(self, *a, **k):
        pass


def enabled(area: str) -> bool:
    areas = settings().log_areas
    return area in areas or "all" in areas


def log(area: str) -> logging.Logger:
    """``log("passes").info(...)`` prints to stderr when KILN_LOG names the area."""
    logger = logging.getLogger(f"kiln.{area}")
    if not getattr(logger, "_kiln_configured", False):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[kiln {area}] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
        logger._kiln_configured = True
    logger.setLevel(logging.DEBUG if enabled(area) else logging.WARNING)
    return logger
