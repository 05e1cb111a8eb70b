"""KV cache between workers: layout agreement (layout), what the KV is of (binding), bounded checksummed
chunks (chunks), and the transfer itself behind one small interface (transport/)."""
