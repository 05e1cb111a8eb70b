"""kv_store: the KV relay and store."""
