"""The cluster's certificate authority: one CA, and a certificate and key per node, in one directory (0700, files 0600).

Controller and gateways authenticate each other with them: a peer must show a certificate this CA signed for a name
that is a node of the cluster (cluster.json), or the connection is closed before anything is read from it."""

from __future__ import annotations

import datetime
import json
import os
import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NODE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CA_DAYS = 3650
NODE_DAYS = 825
MANIFEST = "cluster.json"


class ClusterError(Exception):
    """A cluster directory that cannot be made, read or trusted, or a node name that is not allowed."""


def check_name(name: str) -> str:
    if not NODE_NAME.match(name):
        raise ClusterError(f"{name!r} is not a node name: 1-63 lowercase letters, digits and '-', not starting with '-'")
    return name


def _private(path: Path, data: bytes) -> None:
    """Write a new file, mode 0600, durably; never over an existing one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


@dataclass
class Cluster:
    """A cluster directory: ca.pem, ca.key (only where nodes are added), NAME.pem + NAME.key per node, cluster.json."""

    path: Path

    @classmethod
    def init(cls, path: str, nodes: list[str]) -> Cluster:
        """Make a new cluster directory with a CA and the named nodes; refuses a directory that holds anything."""
        for name in nodes:
            check_name(name)
        if len(set(nodes)) != len(nodes) or not nodes:
            raise ClusterError("--nodes needs one or more distinct names")
        where = Path(path)
        try:
            where.mkdir(mode=0o700, parents=False, exist_ok=True)
        except OSError as exc:
            raise ClusterError(f"cannot make {path}: {exc.strerror}") from None
        if where.is_symlink() or any(where.iterdir()):
            raise ClusterError(f"{path} is not an empty directory: a cluster is made once (add nodes with `san cluster add`)")
        os.chmod(where, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"san cluster CA {os.urandom(4).hex()}")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .sign(key, hashes.SHA256())
        )
        _private(where / "ca.key", _key_bytes(key))
        _private(where / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        _private(where / MANIFEST, json.dumps({"nodes": []}).encode())
        cluster = cls(where)
        for node in nodes:
            cluster.add(node)
        return cluster

    @classmethod
    def open(cls, path: str) -> Cluster:
        where = Path(path)
        if not (where / "ca.pem").is_file() or not (where / MANIFEST).is_file():
            raise ClusterError(f"{path} is not a cluster directory (make one with `san cluster init`)")
        return cls(where)

    def nodes(self) -> list[str]:
        try:
            nodes = json.loads((self.path / MANIFEST).read_text())["nodes"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ClusterError(f"cannot read {self.path / MANIFEST}: {exc}") from None
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise ClusterError(f"{self.path / MANIFEST} is damaged")
        return nodes

    def add(self, name: str) -> None:
        """A key and a certificate for a new node, signed by the CA (which needs ca.key here)."""
        check_name(name)
        nodes = self.nodes()
        if name in nodes:
            raise ClusterError(f"node {name!r} is already in the cluster")
        try:
            ca_key = serialization.load_pem_private_key((self.path / "ca.key").read_bytes(), None)
            ca = x509.load_pem_x509_certificate((self.path / "ca.pem").read_bytes())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot use the CA in {self.path} (ca.key is needed to add nodes): {exc}") from None
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=NODE_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .sign(ca_key, hashes.SHA256())
        )
        _private(self.path / f"{name}.key", _key_bytes(key))
        _private(self.path / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        manifest = self.path / MANIFEST
        fresh = manifest.with_suffix(".new")
        _private(fresh, json.dumps({"nodes": [*nodes, name]}).encode())
        os.replace(fresh, manifest)

    def context(self, name: str, server: bool) -> ssl.SSLContext:
        """A TLS context for node `name`: its certificate, the cluster's CA to verify the peer's, TLS 1.3 only, and a
        peer certificate required on both sides. The peer's name is checked with peer_name() after the handshake."""
        if name not in self.nodes():
            raise ClusterError(f"{name!r} is not a node of the cluster in {self.path}")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = False  # peers are named by the cluster, not by DNS: peer_name() checks the name
        try:
            context.load_verify_locations(str(self.path / "ca.pem"))
            context.load_cert_chain(str(self.path / f"{name}.pem"), str(self.path / f"{name}.key"))
        except (OSError, ssl.SSLError) as exc:
            raise ClusterError(f"cannot load node {name!r}'s certificate from {self.path}: {exc}") from None
        return context

    def peer_name(self, peer: dict[str, object] | None) -> str:
        """The node name of a verified peer certificate (ssl's getpeercert()); ClusterError if it is not a node."""
        names = [v for kind, v in (peer or {}).get("subjectAltName", ()) if kind == "DNS"]  # type: ignore[attr-defined]
        if len(names) != 1 or names[0] not in self.nodes():
            raise ClusterError(f"peer certificate names {names or 'no node'}, not a node of this cluster")
        return str(names[0])
