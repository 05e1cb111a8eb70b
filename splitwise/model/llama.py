"""A Llama-family decoder in plain PyTorch over a flattened batch, with its KV cache in caller-owned paged slots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from splitwise.model.attention import BatchLayout, paged_attention

# Called as (layer, keys, values) when a layer's KV for the batch's new tokens is ready:
# keys and values are [new_tokens, num_kv_heads, head_dim].
LayerKVCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" or hf.get("rope_scaling"):
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}; only plain RoPE models are supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            rms_norm_eps=hf["rms_norm_eps"],
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_position_embeddings=hf["max_position_embeddings"],
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
        )


# Up to this many rows (decode batches), CPU BLAS computes W @ x^T much faster than x @ W^T: it
# streams the weight once instead of packing it (measured 1.3-3x on AVX2 with MKL).
SMALL_BATCH_ROWS = 128


class Linear(nn.Linear):
    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= SMALL_BATCH_ROWS:
            return (self.weight @ x.t()).t()
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        # q, k and v in one matmul: Hugging Face's q_proj / k_proj / v_proj, stacked (fuse_hf_state).
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache_keys: torch.Tensor,
        cache_values: torch.Tensor,
        batch: BatchLayout,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [N, hidden]; cache_*: [num_kv_heads, slots, head_dim]. Returns (out, new keys, new values)."""
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(n, self.num_heads, self.head_dim)
        k = k.reshape(n, self.num_kv_heads, self.head_dim)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = paged_attention(q, k, v, cache_keys, cache_values, batch)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim)), k, v


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        # gate and up in one matmul: Hugging Face's gate_proj / up_proj, stacked (fuse_hf_state).
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate).mul_(up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaModel(nn.Module):
    """Parameter names follow Hugging Face's LlamaForCausalLM, except the fused projections (fuse_hf_state)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def fuse_hf_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Maps a Hugging Face Llama state dict onto ours: q/k/v and gate/up weights stacked row-wise."""
        fused = dict(state)
        groups = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
        for key in state:
            for target, parts in groups.items():
                if key.endswith(f"{parts[0]}.weight"):
                    prefix = key[: -len(f"{parts[0]}.weight")]
                    names = [f"{prefix}{part}.weight" for part in parts]
                    fused[f"{prefix}{target}.weight"] = torch.cat([fused.pop(name) for name in names])
        return fused

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.model.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,
        batch: BatchLayout,
        cache_keys: torch.Tensor,
        cache_values: torch.Tensor,
        on_layer_kv: LayerKVCallback | None = None,
    ) -> torch.Tensor:
        """Runs a flattened batch of new tokens and returns float32 logits [len(batch.logits_rows), vocab].

        cache_keys / cache_values: [num_layers, num_kv_heads, slots, head_dim]; the context of every
        sequence before its new tokens must already be in its slots.
        """
        x = self.model.embed_tokens(token_ids)
        cos, sin = self.rope(batch.positions, x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        for i, layer in enumerate(self.model.layers):
            attn_out, k, v = layer.self_attn(
                layer.input_layernorm(x), cos, sin, cache_keys[i], cache_values[i], batch
            )
            if on_layer_kv is not None:
                on_layer_kv(i, k, v)
            x = x + attn_out
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        last = self.model.norm(x[batch.logits_rows])
        return self.lm_head(last).float()
