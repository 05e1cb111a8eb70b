"""The credentials of a local cluster (`splitwise up`): made once in its run dir and kept there for later runs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from splitwise.security.keys import ADMIN_KEY_FILE, API_KEY_FILE, new_secret, write_key
from splitwise.security.tls import ClusterTLS, default_hosts, make_cluster_certs

REDIS_PASSWORD_FILE = "redis-password"
TLS_SUBDIR = "tls"


@dataclass(frozen=True)
class LocalCredentials:
    tls_dir: Path
    api_key: str
    admin_key: str
    redis_password: str

    def admin_identity(self) -> ClusterTLS:
        return ClusterTLS.load(self.tls_dir, "admin")


def service_env(credentials: LocalCredentials | None) -> dict[str, str]:
    """What every service of a local cluster is told of its credentials (None: an --insecure cluster)."""
    if credentials is None:
        return {"SPLITWISE_INSECURE": "1", "SPLITWISE_TLS_DIR": ""}
    return {"SPLITWISE_TLS_DIR": str(credentials.tls_dir), "SPLITWISE_INSECURE": "0"}


def scheduler_env(credentials: LocalCredentials | None) -> dict[str, str]:
    """What a scheduler replica is told besides: the public API's keys."""
    if credentials is None:
        return {"SPLITWISE_API_KEY": "", "SPLITWISE_ADMIN_KEY": ""}
    return {"SPLITWISE_API_KEY": credentials.api_key, "SPLITWISE_ADMIN_KEY": credentials.admin_key}


def _kept_secret(path: Path, env: str = "") -> str:
    """The value of env when set (also written to path, so that local clients reading it agree), else the secret
    kept in path, else a new one written there (mode 0600)."""
    given = os.environ.get(env, "").strip() if env else ""
    if given:
        write_key(path, given)
        return given
    try:
        kept = path.read_text().strip()
        if kept:
            return kept
    except OSError:
        pass
    value = new_secret()
    write_key(path, value)
    return value


def local_credentials(run_dir: Path, host: str) -> LocalCredentials:
    run_dir.mkdir(parents=True, exist_ok=True)
    tls_dir = run_dir / TLS_SUBDIR
    hosts = default_hosts()
    make_cluster_certs(tls_dir, hosts + ([host] if host not in hosts else []))
    return LocalCredentials(tls_dir.resolve(), _kept_secret(run_dir / API_KEY_FILE, "SPLITWISE_API_KEY"),
                            _kept_secret(run_dir / ADMIN_KEY_FILE, "SPLITWISE_ADMIN_KEY"),
                            _kept_secret(run_dir / REDIS_PASSWORD_FILE))
