"""Log a backend decision once per reason: a fallback to a slower path is never silent, and never spam."""

from __future__ import annotations

import logging

logger = logging.getLogger("kvforge.kernels")
_logged: set[str] = set()


def log_once(reason: str, message: str, level: int = logging.WARNING) -> bool:
    """Emit ``message`` the first time ``reason`` is seen; True if it was emitted now."""
    if reason in _logged:
        return False
    _logged.add(reason)
    logger.log(level, message)
    return True
