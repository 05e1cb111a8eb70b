"""The cluster key and HMAC signatures made with it (registry entries, resume tokens)."""

from __future__ import annotations

import hashlib
import hmac
import os
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


# Where `splitwise up` keeps the public API's keys (RUN_DIR, .splitwise by default), one secret per file.
API_KEY_FILE = "api-key"
ADMIN_KEY_FILE = "admin-key"
DEFAULT_RUN_DIR = ".splitwise"


def configured_key(env: str, file_name: str, run_dir: str = DEFAULT_RUN_DIR) -> str:
    """A client's key: the environment variable, else the file a local `splitwise up` wrote, else none."""
    value = os.environ.get(env, "").strip()
    if value:
        return value
    try:
        return (Path(run_dir) / file_name).read_text().strip()
    except OSError:
        return ""


def write_key(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
