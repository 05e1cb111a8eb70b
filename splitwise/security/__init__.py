"""Cluster security: the cluster CA and certificates (mTLS between services), the cluster key (HMAC signatures of
registry entries and resume tokens), and the public API's keys."""
