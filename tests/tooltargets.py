"""Bridge-side tools for the tests (`BRIDGE_TOOLS=tests.tooltargets:get_weather`).

Kept free of test imports: the bridge process imports this module.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal


def get_weather(city: str, unit: Literal["c", "f"] = "c") -> dict[str, Any]:
    """Today's weather in a city.

    Args:
        city: the city's name.
        unit: c for Celsius, f for Fahrenheit.
    """
    return {"city": city, "temp": 21 if unit == "c" else 70}


async def slow(seconds: float) -> str:
    """Sleep, then say so."""
    await asyncio.sleep(seconds)
    return "woke"


def blocking(seconds: float) -> str:
    """Block a thread, then say so."""
    time.sleep(seconds)
    return "woke"


def broken() -> None:
    """Fail."""
    raise RuntimeError("no sensor")
