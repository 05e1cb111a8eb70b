"""Model: weights loading and caching, the Llama forward pass, the tiny test model."""

DEFAULT_MODEL = "smollm2-135m-instruct"
