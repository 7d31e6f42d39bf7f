"""The TLS listener (8883 in broker/mosquitto.conf) with certificates from `llm-bridge broker tls`:
the bridge connects with mqtts:// and the CA file, and so does a device."""

from __future__ import annotations

import getpass
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509

from bridge.ops.brokerconf import render_config
from bridge.ops.tlsgen import make_certificates
from tests.harness import REPO, BridgeProcess, Broker, free_port, mosquitto_binary, wait_port


class TlsBroker(Broker):
    """The project's broker with its 1883 and 8883 listeners (not 9001: no websockets here)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.tls_port = free_port()

    def start(self) -> TlsBroker:
        conf = render_config(
            config_dir=self.dir,
            data_dir=self.dir / "data",
            ports={1883: self.port, 8883: self.tls_port},
            log_file=self.log_file,
            run_as=getpass.getuser() if os.geteuid() == 0 else None,
        )
        assert "listener 9001" not in conf and "websockets" not in conf
        (self.dir / "mosquitto.conf").write_text(conf)
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.dir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        wait_port(self.port)
        wait_port(self.tls_port)
        return self

    def tls_url(self, user: str) -> str:
        return f"mqtts://{user}:{self.users[user]}@127.0.0.1:{self.tls_port}"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    workdir = tmp_path_factory.mktemp("tls-broker")
    made = subprocess.run(
        [sys.executable, "-m", "bridge", "broker", "tls", "--dir", str(workdir / "certs"),
         "--host", "pi.example.lan", "--host", "192.0.2.7"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    b = TlsBroker(workdir).start()
    yield b
    b.stop()


def test_certificates_are_private_and_name_the_hosts(broker: TlsBroker) -> None:
    certs = broker.dir / "certs"
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((certs / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = set(san.get_values_for_type(x509.DNSName))
    addresses = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    assert {"pi.example.lan", "localhost", "mosquitto"} <= names
    assert {"192.0.2.7", "127.0.0.1"} <= addresses
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_renewal_keeps_the_ca(tmp_path: Path) -> None:
    first = make_certificates(tmp_path, ["a.lan"])
    ca_before = first.ca_cert.read_bytes()
    server_before = first.server_cert.read_bytes()
    second = make_certificates(tmp_path, ["b.lan"])
    assert first.ca_created and not second.ca_created
    assert second.ca_cert.read_bytes() == ca_before  # devices keep their ca.crt
    assert second.server_cert.read_bytes() != server_before
    assert "b.lan" in second.hosts and "a.lan" not in second.hosts


def test_bridge_and_device_over_tls(
    broker: TlsBroker, start_bridge: Callable[..., BridgeProcess], tmp_path: Path
) -> None:
    ca = broker.dir / "certs" / "ca.crt"
    proc = start_bridge(
        BRIDGE_MQTT_URL=broker.tls_url("bridge"),
        BRIDGE_MQTT_CA_FILE=str(ca),
        BRIDGE_TOPIC_PREFIX="llm",
        BRIDGE_DATA_DIR=str(tmp_path / "data"),
    )
    assert f"mqtts://bridge@127.0.0.1:{broker.tls_port}" in proc.logs()
    broker.add_user("tlsdev", "tlsdev-pw")
    chat = subprocess.run(
        [sys.executable, "-m", "bridge", "chat", "--device", "tlsdev", "--timeout", "10",
         "--mqtt-url", broker.tls_url("tlsdev"), "--ca-file", str(ca), "hello over tls"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert "You said: hello over tls." in chat.stdout
    # The TLS listener, too, makes each client id the user name (the bridge sent
    # BRIDGE_CLIENT_ID bridge-NNNN, the chat client tlsdev-RANDOM).
    assert proc.env["BRIDGE_CLIENT_ID"] != "bridge"
    log = broker.log_file.read_text()
    assert re.search(r" as bridge \(p5, c0, .*u'bridge'\)", log), log[-2000:]
    assert re.search(r" as tlsdev \(p\d, .*u'tlsdev'\)", log), log[-2000:]


def test_tls_listener_refuses_what_it_should(broker: TlsBroker) -> None:
    ca = str(broker.dir / "certs" / "ca.crt")
    # Without the local CA the server certificate is not trusted.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(broker.tls_port, ssl.create_default_context(), "127.0.0.1")
    # With it, the name must be one the certificate was made for.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(broker.tls_port, ssl.create_default_context(cafile=ca), "elsewhere.lan")
    handshake(broker.tls_port, ssl.create_default_context(cafile=ca), "localhost")


def handshake(port: int, ctx: ssl.SSLContext, server_name: str) -> None:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=server_name),
    ):
        pass
