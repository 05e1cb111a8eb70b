"""The cluster CA and its certificates (`splitwise certs`), and the gRPC credentials each service builds from them.

Every service of a cluster holds a certificate signed by the cluster's own CA, whose common name is its role.
Internal connections verify the peer against that CA (not against a host name: workers move between hosts and
addresses), so only holders of a cluster certificate take part; the role in the certificate says what a peer may
call (splitwise.security.peers).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitwise.security.keys import CLUSTER_KEY_FILE, new_secret

# The name every cluster certificate carries and every internal connection expects, whatever address it dials.
CLUSTER_SERVER_NAME = "splitwise.cluster"
CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"
# One identity per role; "admin" is the operator (`splitwise up`'s health checks, `splitwise health`).
ROLES = ("scheduler", "prompt_worker", "token_worker", "kv_store", "admin")
VALID_DAYS = 825


def cert_file(role: str) -> str:
    return f"{role}.pem"


def key_file(role: str) -> str:
    return f"{role}-key.pem"


def default_hosts() -> list[str]:
    """Names the scheduler's certificate is valid for, for public TLS clients that verify host names."""
    hosts = ["localhost", "127.0.0.1", "::1"]
    try:
        hosts.append(socket.gethostname())
    except OSError:
        pass
    return hosts


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_cluster_certs(directory: Path, hosts: list[str] | None = None, force: bool = False) -> bool:
    """Writes a new cluster CA, a certificate and key per role, and the cluster key into directory.
    Keeps what is there unless force; returns whether it wrote."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory = Path(directory)
    if not force and all((directory / f).exists() for f in (CA_FILE, CLUSTER_KEY_FILE, *map(cert_file, ROLES))):
        return False
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=VALID_DAYS)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "splitwise cluster CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = [x509.DNSName(CLUSTER_SERVER_NAME)]
    for host in hosts if hosts is not None else default_hosts():
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        (directory / cert_file(role)).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(directory / key_file(role), pem_key(key))
    (directory / CA_FILE).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / CA_KEY_FILE, pem_key(ca_key))
    _write_private(directory / CLUSTER_KEY_FILE, new_secret().encode())
    return True


@dataclass(frozen=True)
class ClusterTLS:
    """One service's cluster identity: the CA it trusts, its certificate and key, and its role."""

    role: str
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, tls_dir: str | Path, role: str) -> "ClusterTLS":
        directory = Path(tls_dir)
        try:
            return cls(role, (directory / CA_FILE).read_bytes(), (directory / cert_file(role)).read_bytes(),
                       (directory / key_file(role)).read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read the cluster TLS files for {role} in {directory}: {e.strerror} "
                             f"({e.filename}); make them with `splitwise certs --dir {directory}`") from e

    def server_credentials(self, require_client_auth: bool = True) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=require_client_auth)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    @staticmethod
    def channel_options() -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", CLUSTER_SERVER_NAME)]


def cluster_tls(tls_dir: str, insecure: bool, role: str) -> ClusterTLS | None:
    """The service's identity from its config; None only when it runs --insecure. Refuses to go on without either."""
    if tls_dir:
        return ClusterTLS.load(tls_dir, role)
    if insecure:
        return None
    raise ValueError("no cluster TLS: pass --tls-dir DIR (SPLITWISE_TLS_DIR; make it with `splitwise certs --dir "
                     "DIR`), or --insecure (SPLITWISE_INSECURE=1) to run without authentication")


def secure_channel(address: str, tls: ClusterTLS | None, options: list | None = None, **kwargs):
    """A grpc.aio channel to a cluster peer: mTLS with tls, plaintext without (insecure mode)."""
    options = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options, **kwargs)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options + tls.channel_options(),
                                   **kwargs)


def sync_channel(address: str, tls: ClusterTLS | None) -> grpc.Channel:
    """The same, blocking (the launcher's health checks)."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials(), options=tls.channel_options())


def internal_server_security(tls: ClusterTLS | None) -> dict:
    """start_server's keyword arguments for an internal service: mTLS, and each method only for its roles."""
    if tls is None:
        return {}
    from splitwise.security.peers import ClusterPeerInterceptor

    return {"credentials": tls.server_credentials(), "interceptors": [ClusterPeerInterceptor()]}
