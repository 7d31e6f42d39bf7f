"""Fixtures for the device tests: the MicroPython VM, TLS material, an HTTPS mock LLM.

The helpers live in ``tests/device/vmkit.py`` (also used by
``python -m tests.device.memory``).
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.device import vmkit  # noqa: E402

API_KEY = "sk-device-test-0123456789"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def umqtt_dir() -> Path:
    """``.cache/umqtt`` holding umqtt/simple.py 1.3.4 (fetched from PyPI once)."""
    return vmkit.ensure_umqtt()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost signed by it, and wrong ones."""
    return vmkit.make_certs(tmp_path_factory.mktemp("certs"))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


@pytest.fixture(scope="module")
def tls_mock(certs: dict[str, Path]) -> Iterator[object]:
    """The mock LLM serving HTTPS with the test CA's localhost certificate.

    Its ``base_url`` uses the name ``localhost`` so the device checks the
    certificate's name.
    """
    from bridge.dev.mock_llm import running_mock

    with running_mock(
        ssl_context=server_context(certs["cert"], certs["key"]), api_key=API_KEY
    ) as handle:
        handle.base_url = handle.base_url.replace("127.0.0.1", "localhost")
        yield handle
