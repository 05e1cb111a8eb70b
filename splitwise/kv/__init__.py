"""KV cache on the wire: layout agreement, bounded checksummed chunks, and the gRPC stream transport."""
