"""Model: weights loading and caching, the Llama forward pass, the tiny test model, the mock model."""

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_MOCK_PROFILE = "llama2-70b@dgx-a100"  # what a mock engine models (splitwise/model/mock.py)
