"""The mock model: a machine profile standing in for a real model's weights, for mock-engine workers (issue 15 §4).

A mock-engine worker runs the real engine (scheduler, blocks, KV transports) with model compute replaced by the
profile's modelled step time (splitwise/engine/mock_runner.py). What it serves is named `mock:PROFILE`; its KV has
the modelled model's layers, with each token's bytes divided by `kv_scale` so that one machine can carry a cluster's
transfers. Nothing here loads weights or allocates a KV cache: a mock worker costs its process and its sockets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitwise.model import DEFAULT_MOCK_PROFILE
from splitwise.model.tiny import SPECIAL_TOKENS

if TYPE_CHECKING:  # (torch and the profiles: not for those who only need the names)
    from splitwise.model.llama import LlamaConfig
    from splitwise.sim.machines import MachineProfile

MOCK_PREFIX = "mock:"
MOCK_VOCAB_SIZE = 32000  # Llama 2's
# Long enough for every request of the shipped Azure traces (prompt + output at most 14,089 tokens).
MOCK_CONTEXT_TOKENS = 16384
# Token ids the mock samples: past the special tokens and the 256 byte tokens, so that no output is an EOS and every
# token decodes to a word (the mock tokenizer spells token i >= this as " w<i>").
FIRST_WORD_TOKEN_ID = len(SPECIAL_TOKENS) + 256
MOCK_DTYPES = {2: "float16", 4: "float32"}  # the modelled KV element's bytes -> the dtype of the KV sent


def mock_model_name(profile: str) -> str:
    return MOCK_PREFIX + profile


def is_mock(model_name: str) -> bool:
    return model_name.startswith(MOCK_PREFIX)


def served_model_name(config) -> str:
    """What a service's config serves: `mock:PROFILE` with --engine mock, else --model."""
    if config.engine == "mock":
        return mock_model_name(config.mock_profile)
    if config.engine != "real":
        raise ValueError(f"engine must be 'real' or 'mock', got {config.engine!r}")
    return config.model


@dataclass(frozen=True)
class MockModel:
    """What a mock worker serves, in the shape the engine reads from a LoadedModel (name, config, fingerprint,
    EOS ids), with the profile whose step times and KV capacity it models."""

    name: str
    config: LlamaConfig  # the shapes of the KV actually sent: the modelled layers, 1 KV head of the scaled width
    fingerprint: str
    eos_token_ids: tuple[int, ...]
    profile: MachineProfile
    time_factor: float
    kv_scale: float
    dtype: str

    @property
    def kv_capacity_tokens(self) -> int:
        return self.profile.kv_capacity_tokens

    @property
    def modelled_kv_bytes_per_token(self) -> int:
        return self.profile.model.kv_bytes_per_token

    @property
    def sent_kv_bytes_per_token(self) -> int:
        c = self.config
        return 2 * c.num_layers * c.num_kv_heads * c.head_dim * self.profile.model.dtype_bytes

    def describe(self) -> str:
        return (f"{self.name}: step times x{self.time_factor:g}, KV capacity {self.kv_capacity_tokens} tokens, KV sent "
                f"{self.sent_kv_bytes_per_token} B/token of the modelled {self.modelled_kv_bytes_per_token} "
                f"(kv_scale {self.kv_scale:g})")


def load_mock_model(profile_name: str = DEFAULT_MOCK_PROFILE, time_factor: float = 1.0, kv_scale: float = 1.0) -> MockModel:
    from splitwise.model.llama import LlamaConfig
    from splitwise.sim.machines import resolve_profile

    if not time_factor > 0:
        raise ValueError(f"the mock's time factor must be > 0, got {time_factor}")
    if not kv_scale >= 1:
        raise ValueError(f"the mock's KV scale must be >= 1 (KV sent = modelled / scale), got {kv_scale}")
    profile = resolve_profile(profile_name)
    spec = profile.model
    if spec.dtype_bytes not in MOCK_DTYPES:
        raise ValueError(f"{spec.name}: KV elements of {spec.dtype_bytes} bytes have no torch dtype here")
    width = max(1, round(spec.num_kv_heads * spec.head_dim / kv_scale))
    config = LlamaConfig(
        vocab_size=MOCK_VOCAB_SIZE, hidden_size=width, intermediate_size=width, num_layers=spec.num_layers,
        num_heads=1, num_kv_heads=1, head_dim=width, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=MOCK_CONTEXT_TOKENS, tie_word_embeddings=True,
    )
    name = mock_model_name(profile_name)
    # Workers agree on KV only with the same profile and scale (the layout's width says the scale too).
    fingerprint = hashlib.sha256(f"{name} kv_scale={kv_scale:g}".encode()).hexdigest()[:16]
    return MockModel(name, config, fingerprint, eos_token_ids=(SPECIAL_TOKENS.index("<|im_end|>"),),
                     profile=profile, time_factor=time_factor, kv_scale=kv_scale,
                     dtype=MOCK_DTYPES[spec.dtype_bytes])


def mock_tokenizer():
    """The scheduler's tokenizer for a mock model: tiny-llama's byte-level one (every byte a token, the chat template),
    widened to MOCK_VOCAB_SIZE with word tokens that only the mock samples."""
    from splitwise.model.tiny import build_tokenizer

    return build_tokenizer(vocab_size=MOCK_VOCAB_SIZE)
