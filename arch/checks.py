"""Small helpers for config checks whose errors name the field, the value and what is allowed."""

from __future__ import annotations


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_positive(config: object, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None or value <= 0:
            raise ValueError(f"{type(config).__name__}.{name}={value!r}: must be positive")
