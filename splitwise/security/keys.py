"""The cluster key and HMAC signatures made with it (registry entries, resume tokens)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from pathlib import Path

CLUSTER_KEY_FILE = "cluster.key"
# Without a TLS dir (--insecure) there is no secret: signatures still have a key, but anyone can make them.
INSECURE_CLUSTER_KEY = b"splitwise-insecure-cluster-key"


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def load_cluster_key(tls_dir: str) -> bytes:
    """The cluster key in tls_dir (written by `splitwise certs`), or the insecure placeholder without a TLS dir."""
    if not tls_dir:
        return INSECURE_CLUSTER_KEY
    path = Path(tls_dir) / CLUSTER_KEY_FILE
    try:
        return path.read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read the cluster key {path}: {e.strerror}; run `splitwise certs --dir {tls_dir}`") from e


def _message(parts) -> bytes:
    # Length-prefixed, so that ("ab", "c") and ("a", "bc") sign differently.
    out = bytearray()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode()
        out += len(data).to_bytes(8, "big") + data
    return bytes(out)


def sign(key: bytes, *parts) -> str:
    """HMAC-SHA256 of the parts, hex."""
    return hmac.new(key, _message(parts), hashlib.sha256).hexdigest()


def verify(key: bytes, signature: str, *parts) -> bool:
    return isinstance(signature, str) and hmac.compare_digest(signature, sign(key, *parts))
