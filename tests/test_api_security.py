"""The management API as an attacker on the same machine (user nobody) and a careless admin meet it: no token, no
service; no storage san was not given; TLS and a token from another host; bounded bodies; slow clients dropped.

Each test replays a sequence that once worked against san: a setuid copy of passwd adopted as a pool by nobody,
a root-only file zeroed by the reserve refill, --api 0.0.0.0 accepted, 300 trickling clients held open for a minute."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SanServer, assert_one_line, free_port, run_san, san_command, serving
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

MIB = 1 << 20
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
# The client nobody runs: the system's Python (the test venv's lives under /root, which nobody cannot enter).
CLIENT = """
import json, sys, urllib.error, urllib.request
url, method, body, token = sys.argv[1:5]
request = urllib.request.Request(url, data=body.encode() or None, method=method)
request.add_header("Content-Type", "application/json")
if token:
    request.add_header("Authorization", "Bearer " + token)
try:
    with urllib.request.urlopen(request, timeout=20) as response:
        print(response.status, response.read().decode())
except urllib.error.HTTPError as exc:
    print(exc.code, exc.read().decode())
"""


def as_nobody(server: SanServer, method: str, path: str, body: Any = None, token: str = "") -> tuple[int, Any]:
    data = "" if body is None else json.dumps(body)
    result = subprocess.run(
        [*NOBODY, "/usr/bin/python3", "-c", CLIENT, server.api + path, method, data, token],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    status, _, payload = result.stdout.partition(" ")
    return int(status), json.loads(payload) if payload.strip() else None


def nobody_can_read(path: str | Path) -> bool:
    probe = subprocess.run([*NOBODY, "/usr/bin/python3", "-c", f"open({str(path)!r}).read()"], capture_output=True, cwd="/")
    return probe.returncode == 0


def digest(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mode, st.st_uid


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SanServer]:
    base = tmp_path_factory.mktemp("security")
    allowed = base / "allowed"
    allowed.mkdir()
    with serving(base, "--allow-path", str(allowed)) as san:
        san.ok("pool", "create", "p", "--size", "64M")
        yield san


@pytest.fixture
def allowed(server: SanServer) -> Path:
    return Path(server.data).parent / "allowed"


def test_nobody_gets_nothing_without_the_token(server: SanServer, allowed: Path) -> None:
    passwd = allowed / "passwd"
    shutil.copy("/usr/bin/passwd", passwd)
    os.chmod(passwd, 0o4755)
    before = digest(passwd)
    pools = server.get("/pools")
    # The original sequence: a pool on the setuid file, a thick vdisk, a host and a zone, all as nobody.
    sequence = [
        ("POST", "/pools", {"name": "evil", "path": str(passwd), "existing": True}),
        ("POST", "/vdisks", {"name": "evil", "pool": "p", "size": "8M", "thick": True}),
        ("POST", "/hosts", {"name": "evil", "iqn": "iqn.2024-01.org.example:evil"}),
        ("POST", "/zones", {"host": "evil", "vdisk": "evil"}),
        ("GET", "/pools", None),
        ("GET", "/status", None),
        ("DELETE", "/pools/p", None),
    ]
    for method, path, body in sequence:
        status, answer = as_nobody(server, method, path, body)
        assert status == 401, (method, path, status, answer)
        assert "token" in answer["error"]
        assert as_nobody(server, method, path, body, token="guessed-" + "x" * 30)[0] == 401
    assert as_nobody(server, "GET", "/openapi.json")[0] == 200, "the API's description is public; nothing else is"
    assert server.get("/pools") == pools and server.get("/hosts") == [] and server.get("/vdisks") == []
    assert digest(passwd) == before
    # The token is where root's CLI finds it, and nowhere nobody can read it.
    token_file = Path(server.data) / "api-token"
    published = Path(os.environ["SAN_RUNTIME_DIR"]) / f"api-127.0.0.1-{server.port}.token"
    assert published.read_text().strip() == token_file.read_text().strip() == server.token
    for secret in (token_file, published):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and not nobody_can_read(secret)
    assert "refused API requests from 127.0.0.1 without a valid token" in server.log_text()


def test_root_without_a_token_file_is_told_what_to_do(server: SanServer, tmp_path: Path) -> None:
    env = {**server.env(), "SAN_RUNTIME_DIR": str(tmp_path / "elsewhere")}
    result = run_san("pool", "list", env=env)
    assert result.returncode == 1
    assert "needs its token" in assert_one_line(result.stderr) and "--token-file" in result.stderr
    token = tmp_path / "token"
    token.write_text(server.token or "")
    assert run_san("--token-file", str(token), "pool", "list", env=env).returncode == 0
    token.write_text("wrong-token-wrong-token")
    result = run_san("pool", "list", "--token-file", str(token), env=env)
    assert result.returncode == 1 and "authentication required" in result.stderr


def test_programs_and_foreign_files_are_never_taken(server: SanServer, allowed: Path, tmp_path: Path) -> None:
    passwd = allowed / "passwd-copy"
    shutil.copy("/usr/bin/passwd", passwd)
    os.chmod(passwd, 0o4755)
    script = allowed / "tool"
    script.write_bytes(b"#!/bin/sh\necho hi\n" + bytes(4 * MIB))
    os.chmod(script, 0o700)
    linked = allowed / "linked.img"
    linked.write_bytes(bytes(4 * MIB))
    os.link(linked, allowed / "second-name.img")
    foreign = allowed / "foreign.img"
    foreign.write_bytes(bytes(4 * MIB))
    os.chown(foreign, 65534, 65534)
    outside = tmp_path / "root-only.img"
    outside.write_bytes(b"precious " * (MIB // 4))
    os.chmod(outside, 0o600)
    cases = [
        (passwd, False, "--existing"),
        (passwd, True, "setuid"),
        (script, True, "executable"),
        (linked, True, "hard links"),
        (foreign, True, "belongs to uid 65534"),
        (outside, True, "--allow-path"),
        (tmp_path / "new-outside.img", False, "not under a directory allowed"),
    ]
    before = {path: digest(path) for path, _, _ in cases if path.exists()}
    pools = server.get("/pools")
    for path, existing, message in cases:
        status, answer = server.http("POST", "/pools", {"name": "taken", "path": str(path), "existing": existing, "size": "4M"})
        assert status in (400, 409), (path, status, answer)
        assert message in answer["error"], (path, answer)
    time.sleep(2.5)  # long enough for the reserve refill of a pool that had taken one of them
    assert {path: digest(path) for path in before} == before
    assert not (tmp_path / "new-outside.img").exists()
    assert server.get("/pools") == pools
    # What may be taken: a plain file of ours under an allowed directory, and a new file there.
    plain = allowed / "plain.img"
    plain.write_bytes(bytes(8 * MIB))
    os.chmod(plain, 0o600)
    server.ok("pool", "create", "plain", "--path", str(plain), "--existing")
    server.ok("pool", "create", "fresh", "--path", str(allowed / "fresh.img"), "--size", "8M")
    assert stat.S_IMODE((allowed / "fresh.img").stat().st_mode) == 0o600
    server.ok("pool", "delete", "plain")
    server.ok("pool", "delete", "fresh")
    assert plain.read_bytes()[:4096] == bytes(4096), "a taken file's label is wiped when its pool goes"


def test_the_api_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    for api in (f"0.0.0.0:{free_port()}", f"[::]:{free_port()}"):
        result = run_san("serve", "--data", str(tmp_path / "data"), "--api", api, "--portal", "none", timeout=30)
        assert result.returncode == 1
        assert "without TLS" in assert_one_line(result.stderr)
    result = run_san("serve", "--data", str(tmp_path / "data"), "--api-cert", "/nonexistent", "--portal", "none", timeout=30)
    assert result.returncode == 1 and "--api-key" in assert_one_line(result.stderr)


def _certificates(directory: Path, address: str) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for address signed by it: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "san test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, address)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(address))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths[2], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


@pytest.fixture
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair: (server namespace, client namespace); 198.18.0.1 and .2."""
    suffix = f"{os.getpid() % 10000}"
    server_ns, client_ns = f"san-srv-{suffix}", f"san-cli-{suffix}"
    commands = [
        ["ip", "netns", "add", server_ns],
        ["ip", "netns", "add", client_ns],
        ["ip", "link", "add", f"vs{suffix}", "type", "veth", "peer", "name", f"vc{suffix}"],
        ["ip", "link", "set", f"vs{suffix}", "netns", server_ns],
        ["ip", "link", "set", f"vc{suffix}", "netns", client_ns],
        ["ip", "-n", server_ns, "addr", "add", "198.18.0.1/24", "dev", f"vs{suffix}"],
        ["ip", "-n", client_ns, "addr", "add", "198.18.0.2/24", "dev", f"vc{suffix}"],
        ["ip", "-n", server_ns, "link", "set", f"vs{suffix}", "up"],
        ["ip", "-n", client_ns, "link", "set", f"vc{suffix}", "up"],
        ["ip", "-n", server_ns, "link", "set", "lo", "up"],
        ["ip", "-n", client_ns, "link", "set", "lo", "up"],
    ]
    try:
        for command in commands:
            made = subprocess.run(command, capture_output=True, text=True, check=False)
            if made.returncode != 0:
                pytest.skip(f"cannot make network namespaces here: {made.stderr.strip()}")
        yield server_ns, client_ns
    finally:
        subprocess.run(["ip", "netns", "del", server_ns], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", client_ns], capture_output=True, check=False)


def test_remote_use_needs_tls_and_the_token(tmp_path: Path, two_hosts: tuple[str, str]) -> None:
    server_ns, client_ns = two_hosts
    ca, cert, key = _certificates(tmp_path, "198.18.0.1")
    data = tmp_path / "data"
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    serve = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, *san_command(), "serve", "--data", str(data), "--portal", "none",
         "--api", "198.18.0.1:8443", "--api-cert", str(cert), "--api-key", str(key)],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        token = data / "api-token"
        url = "https://198.18.0.1:8443"
        env = {**os.environ, "SAN_RUNTIME_DIR": str(tmp_path / "none")}

        def remote(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["ip", "netns", "exec", client_ns, *san_command(), "--api", url, *args],
                capture_output=True, text=True, timeout=60, check=False, env=env,
            )  # fmt: skip

        deadline = time.monotonic() + 30
        while remote("--ca-file", str(ca), "--token-file", str(token), "status").returncode != 0:
            assert serve.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        created = remote("--ca-file", str(ca), "--token-file", str(token), "pool", "create", "far", "--size", "16M")
        assert created.returncode == 0, created.stderr
        assert "far" in remote("--ca-file", str(ca), "--token-file", str(token), "pool", "list").stdout
        no_token = remote("--ca-file", str(ca), "pool", "list")
        assert no_token.returncode == 1 and "needs its token" in assert_one_line(no_token.stderr)
        unverified = remote("--token-file", str(token), "pool", "list")
        assert unverified.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in assert_one_line(unverified.stderr)
        plain = subprocess.run(
            ["ip", "netns", "exec", client_ns, *san_command(), "--api", "http://198.18.0.1:8443", "--token-file", str(token),
             "pool", "list"], capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert plain.returncode == 1, "plain HTTP to the TLS port gets nothing"
    finally:
        serve.terminate()
        assert serve.wait(timeout=30) == 0, (tmp_path / "serve.log").read_text()
        log.close()


def test_request_bodies_are_bounded(server: SanServer) -> None:
    # A 50 MB name: refused by its Content-Length, before a byte of the body is read.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest("POST", "/pools")
        connection.putheader("Authorization", f"Bearer {server.token}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(50 << 20))
        connection.endheaders()
        connection.send(b'{"name": "' + b"x" * 65536)
        response = connection.getresponse()
        assert response.status == 413 and b"larger than" in response.read()
    finally:
        connection.close()
    # Chunked, with no Content-Length to refuse it by.
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.putrequest("POST", "/pools")
        connection.putheader("Authorization", f"Bearer {server.token}")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Transfer-Encoding", "chunked")
        connection.endheaders()
        piece = b"x" * 65536
        try:
            for _ in range(40):
                connection.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            connection.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert connection.getresponse().status == 413
    finally:
        connection.close()
    long_name = server.http("POST", "/pools", {"name": "n" * 100_000, "size": "1G"})
    assert long_name[0] == 400 and len(long_name[1]["error"]) < 1000, "a long invalid name is not echoed back whole"


def test_slow_clients_are_dropped(server: SanServer) -> None:
    sockets = []
    try:
        for _ in range(600):  # more than the API keeps open: the ones waiting longest make room for new ones
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            sock.sendall(b"G")
            sockets.append(sock)
        assert server.http("GET", "/status", timeout=10)[0] == 200, "the API answers while they trickle"
        deadline = time.monotonic() + 30
        open_ones = list(sockets)
        while open_ones and time.monotonic() < deadline:
            time.sleep(2)
            still = []
            for sock in open_ones:
                try:
                    sock.sendall(b"E")
                    sock.setblocking(False)
                    closed = sock.recv(1) == b""
                except BlockingIOError:
                    closed = False
                except OSError:
                    closed = True
                finally:
                    sock.setblocking(True)
                if not closed:
                    still.append(sock)
            open_ones = still
        assert not open_ones, f"{len(open_ones)} trickling connections still open after 30 s"
        assert server.http("GET", "/status")[0] == 200
        assert "dropping the ones that wait longest" in server.log_text()
    finally:
        for sock in sockets:
            sock.close()


SQUATTERS = {
    "ipv4": "s = socket.socket(); s.bind(('127.0.0.1', {port}))",
    "dual-stack": "s = socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0);"
    " s.bind(('::', {port}))",
    "mapped": "s = socket.socket(socket.AF_INET6); s.bind(('::ffff:127.0.0.1', {port}))",
}


@pytest.mark.parametrize("how", sorted(SQUATTERS))
def test_the_token_goes_only_to_the_servers_own_listener(server: SanServer, how: str) -> None:
    """After a crash another user may listen on the API port (on IPv4, or on IPv6 where IPv4 still reaches it);
    the CLI must not hand them root's token."""
    port = free_port()
    script = f"import socket, time; {SQUATTERS[how].format(port=port)}; s.listen(); print('up', flush=True); time.sleep(60)"
    squatter = subprocess.Popen([*NOBODY, "/usr/bin/python3", "-c", script], stdout=subprocess.PIPE, text=True, cwd="/")
    try:
        assert squatter.stdout is not None and squatter.stdout.readline().strip() == "up"
        stale = Path(os.environ["SAN_RUNTIME_DIR"]) / f"api-127.0.0.1-{port}.token"
        stale.write_text((server.token or "") + "\n")
        os.chmod(stale, 0o600)
        result = run_san(
            "--api", f"http://127.0.0.1:{port}", "status", env={k: v for k, v in os.environ.items() if k != "SAN_API"}
        )
        assert result.returncode == 1 and "held by uid 65534" in assert_one_line(result.stderr), result.stderr
        stale.unlink()
    finally:
        squatter.kill()


def test_the_cli_never_sends_the_token_through_a_proxy(server: SanServer) -> None:
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen()
    proxy.settimeout(0.5)
    try:
        env = {**server.env(), "http_proxy": f"http://127.0.0.1:{proxy.getsockname()[1]}", "no_proxy": ""}
        env["HTTP_PROXY"] = env["http_proxy"]
        assert run_san("status", env=env).returncode == 0, "straight to the server"
        with pytest.raises(TimeoutError):
            proxy.accept()
    finally:
        proxy.close()
