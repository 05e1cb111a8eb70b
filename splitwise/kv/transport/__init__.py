"""One request's KV transfer from a prompt worker to a token worker, behind one small interface.

- `base`: the ordered transfer states, the receiver's offer, and what a backend implements.
- `sender` (prompt worker) and `receiver` (token worker): the transfer's two ends; they speak the control
  stream's messages (header, a chunk per layer or bounded run, commit) through a stream the rpc edge opens
  (`splitwise.rpc.kv_stream`), and never build a gRPC stub themselves.
- `registry`: the backends a worker runs and which transport a pair of workers uses.
- Backends, interchangeable: `shm` (same host), `mooncake` (the Mooncake Transfer Engine), `fake` (tests:
  faults on demand); `grpc` needs none, the bytes ride in the stream's messages.

docs/kv_transfer.md walks through a transfer, its states, and what each backend costs.
"""
