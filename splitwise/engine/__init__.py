"""Engine: per-request KV storage with exact accounting, sampling, and the model runner."""
