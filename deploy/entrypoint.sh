#!/bin/sh
# Every splitwise container starts here: the cluster's secrets come from the shared volume the `certs` service
# filled (never from the image or the compose file), then the service runs.
set -e
secret() { cat "/secrets/$1"; }
export SPLITWISE_REDIS_URL="redis://:$(secret redis-password)@redis:6379/0"
export SPLITWISE_API_KEY="${SPLITWISE_API_KEY:-$(secret api-key)}"
export SPLITWISE_ADMIN_KEY="${SPLITWISE_ADMIN_KEY:-$(secret admin-key)}"
exec "$@"
