"""Tiny randomly initialised models of each supported family, built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON, head_dim=16)
    if family == "mistral":
        return MistralConfig(**COMMON, head_dim=16, sliding_window=24)
    if family == "qwen2":
        # Layers >= max_window_layers slide, so this config has both kinds.
        return Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=24, max_window_layers=2)
    if family == "qwen3":
        return Qwen3Config(**COMMON, head_dim=16)
    if family == "gemma3":
        return Gemma3TextConfig(
            **COMMON,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
        )
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def build_tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = tiny_config(family)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init gives near-uniform logits; sharper output weights make greedy choices decisive, so
    # "greedy outputs are identical" is a meaningful check rather than a coin toss between near-ties.
    with torch.no_grad():
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.lm_head.weight.mul_(16.0)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_models():
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            cache[family] = build_tiny_model(family)
        return cache[family]

    return get


# -- real services (see services.py): started once per test session, never mocked, never skipped ------
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    from services import RedisServer

    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    from services import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield cluster
    cluster.kill()


@pytest.fixture(scope="session")
def s3_server():
    from services import S3Server, s3_env

    s3_env()
    server = S3Server().start()
    yield server
    server.kill()


def tiny_tokenizer():
    """A byte-level tokenizer built in-process (256 byte tokens + specials), for the tiny models' vocab."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_tokens = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(sorted(byte_tokens))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")
    tok.add_bos_token = True
    return tok
