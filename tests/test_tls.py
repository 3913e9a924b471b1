"""TLS: the relay serving wss:// and https:// with a certificate of a private CA made here (by
``openssl``), and clients that verify it, or fail clearly, never quietly falling back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from foliosync.client.sync import SyncClient, tls_context
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.http_errors import JsonErrorAppRunner
from foliosync.server.relay import RelayConfig, create_app
from foliosync.server.serve import tls_server_context
from foliosync.sync.errors import ConfigError, ConnectionLost


@dataclass(frozen=True)
class Pki:
    ca: Path  # the CA's certificate: what clients are given
    cert: Path  # the relay's certificate, for 127.0.0.1 and localhost, signed by the CA
    key: Path
    other_ca: Path  # a CA that signed nothing of the relay's


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test CA")
    directory = tmp_path_factory.mktemp("pki")
    _make_ca(directory, "ca")
    _make_ca(directory, "other")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "relay.key", "-out", "relay.csr",
        "-subj", "/CN=127.0.0.1", cwd=directory,
    )  # fmt: skip
    (directory / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "x509", "-req", "-in", "relay.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "relay.pem", "-extfile", "ext.cnf",
        cwd=directory,
    )  # fmt: skip
    return Pki(
        directory / "ca.pem",
        directory / "relay.pem",
        directory / "relay.key",
        directory / "other.pem",
    )


@dataclass
class TlsRelay:
    port: int
    secret: bytes

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/ws"

    @property
    def https(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def token(self, user: str, device: str | None = None, **kwargs: Any) -> str:
        token: str = issue_token(self.secret, user, device=device, **kwargs)
        return token


@pytest.fixture
async def tls_relay(tmp_path: Path, pki: Pki) -> AsyncIterator[TlsRelay]:
    config = RelayConfig(data_dir=tmp_path / "relay", heartbeat=5.0)
    runner = JsonErrorAppRunner(create_app(config), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls_server_context(pki.cert, pki.key))
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield TlsRelay(port, load_or_create_secret(config.data_dir))
    finally:
        await runner.cleanup()


async def test_a_device_syncs_over_wss_with_the_ca_given(
    tls_relay: TlsRelay, pki: Pki, open_replica: Any
) -> None:
    phone = await open_replica("phone")
    await (await phone.create_watchlist("Tech")).add(["AAPL"])
    token = tls_relay.token("alice", "phone")
    assert await SyncClient(phone, tls_relay.url, token, ca_file=pki.ca).sync_once(timeout=10)
    laptop = await open_replica("laptop")
    context = tls_context(pki.ca)
    client = SyncClient(laptop, tls_relay.url, tls_relay.token("alice", "laptop"), ssl=context)
    assert await client.sync_once(timeout=10)
    assert (await laptop.watchlist("Tech")).symbols == ["AAPL"]


@pytest.mark.parametrize("ca", ["system", "other"])
async def test_a_certificate_that_does_not_verify_is_a_clear_connection_lost(
    tls_relay: TlsRelay, pki: Pki, open_replica: Any, ca: str
) -> None:
    replica = await open_replica("phone")
    ca_file = None if ca == "system" else pki.other_ca
    client = SyncClient(replica, tls_relay.url, tls_relay.token("alice"), ca_file=ca_file)
    with pytest.raises(ConnectionLost, match="certificate that does not verify") as caught:
        await client.sync_once(timeout=10)
    assert "self-signed" in str(caught.value) or "unable to get local issuer" in str(caught.value)
    assert "--ca" in str(caught.value)


async def test_the_http_price_api_is_served_over_https(tls_relay: TlsRelay, pki: Pki) -> None:
    context = tls_context(pki.ca)
    token = tls_relay.token("alice")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{tls_relay.https}/healthz", ssl=context) as response:
            assert response.status == 200 and (await response.json())["status"] == "ok"
        headers = {"Authorization": f"Bearer {token}"}
        url = f"{tls_relay.https}/v1/prices?symbols=AAPL"
        async with http.get(url, ssl=context, headers=headers) as response:
            assert response.status == 200, await response.text()
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(f"{tls_relay.https}/healthz")  # the system's CAs do not know it


def test_bad_tls_files_are_a_clear_config_error(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        tls_server_context(tmp_path / "missing.pem", pki.key)
    with pytest.raises(ConfigError, match="cannot use the TLS certificate"):
        tls_server_context(pki.cert, pki.other_ca)  # not a key
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="CA file"):
        tls_context(garbage)
    with pytest.raises(ConfigError, match="CA file"):
        tls_context(tmp_path / "missing-ca.pem")
    server = tls_server_context(pki.cert, pki.key)
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    foliosync = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert foliosync is not None
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    process = await asyncio.create_subprocess_exec(
        foliosync, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**clean, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_relay_command_serves_tls_and_sync_verifies_with_ca(
    tmp_path: Path, pki: Pki
) -> None:
    data = tmp_path / "relay"
    port = free_port()
    foliosync = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert foliosync is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    process = await asyncio.create_subprocess_exec(
        foliosync, "relay", "--port", str(port), "--data", str(data), "--feed", "none",
        "--tls-cert", str(pki.cert), "--tls-key", str(pki.key),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        first = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        second = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        assert first.startswith("foliosync relay on wss://127.0.0.1:"), first
        assert second.startswith("HTTP API on https://127.0.0.1:"), second
        url = f"wss://127.0.0.1:{port}/ws"
        code, token, err = await _cli("token", "alice", "--data", str(data))
        assert code == 0, err
        db = str(tmp_path / "phone.db")
        base = ["sync", "--server", url, "--token", token.strip(), "--timeout", "10"]
        code, out, err = await _cli(*base, "--ca", str(pki.ca), env={"FOLIOSYNC_DB": db})
        assert code == 0, err
        assert out.startswith(f"in sync with {url}")
        code, out, err = await _cli(*base, env={"FOLIOSYNC_DB": db, "FOLIOSYNC_CA": str(pki.ca)})
        assert code == 0, err
        code, out, err = await _cli(*base, env={"FOLIOSYNC_DB": db})
        assert code != 0 and "certificate that does not verify" in out + err, (out, err)
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await asyncio.wait_for(process.wait(), 30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_relay_command_refuses_half_a_tls_configuration(tmp_path: Path, pki: Pki) -> None:
    data = str(tmp_path / "relay")
    code, _, err = await _cli("relay", "--data", data, "--tls-cert", str(pki.cert))
    assert code != 0 and "--tls-cert and --tls-key go together" in err
    missing = str(tmp_path / "nope.pem")
    code, _, err = await _cli("relay", "--data", data, "--tls-cert", missing, "--tls-key", missing)
    assert code != 0 and "does not exist" in err
