"""Model: weights loading and caching, the Llama forward pass, the tiny test model."""
