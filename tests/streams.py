"""Provider stream cases: the project's own fixtures, and the recorded corpus when present.

Why two sources: `tests/fixtures/streams` (one small case per provider
behaviour, written for this project) is always there, so a bare clone tests
everything; `../shared/sse-corpus` (real recordings, beside the clone in CI)
is an extra check whose files never enter the repository. `SSE_CORPUS_DIR`
points at the corpus from a checkout elsewhere (a git worktree, say).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
OWN = REPO / "tests" / "fixtures" / "streams"
_SHARED = Path(os.environ.get("SSE_CORPUS_DIR") or REPO.parent / "shared" / "sse-corpus")
SHARED: Path | None = _SHARED if _SHARED.is_dir() else None
NO_SHARED = (
    "no ../shared/sse-corpus beside this clone (a bare clone): the recorded corpus is an "
    "extra check; the project's own fixtures in tests/fixtures/streams ran instead"
)
SOURCES = {"own": OWN, "shared": SHARED}


@dataclass(frozen=True)
class Case:
    """One response body and the reply a client must assemble from it."""

    source: str
    name: str
    body: bytes
    expect: dict[str, Any]
    ends_with_done: bool

    @property
    def complete(self) -> bool:
        """Whether the body is a whole reply: a finish_reason, or `[DONE]` dispatched."""
        return self.expect["finish_reason"] is not None or self.ends_with_done


def names(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.sse"))


def load(source: str, name: str) -> Case:
    directory = SOURCES[source]
    assert directory is not None, NO_SHARED
    meta = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    # The corpus keeps this fact under stream_facts; our fixtures at the top level.
    done = meta.get("stream_facts", meta)["ends_with_done"]
    body = (directory / f"{name}.sse").read_bytes()
    return Case(source, name, body, meta["expect"], bool(done))


def cases() -> list[Any]:
    """pytest params `(source, name)`: every own case, every corpus case or one skip."""
    params = [pytest.param("own", n, id=f"own-{n}") for n in names(OWN)]
    if SHARED is not None:
        params += [pytest.param("shared", n, id=f"shared-{n}") for n in names(SHARED)]
    else:
        params.append(pytest.param("shared", "", id="shared", marks=pytest.mark.skip(NO_SHARED)))
    return params
