"""Test helpers: random checkpoints (Qwen3 and the other families) written by transformers
itself, plus tokenizers; what a reply of the embedded model must look like."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from asyncllm.bench.model import byte_level_tokenizer
from asyncllm.engine.core import DEFAULT_MODEL_DIR

TINY_MODEL_DIR = DEFAULT_MODEL_DIR

# Two shapes that differ in every way the parity tests care about.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "gqa4-tied": dict(
        vocab_size=384,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
    ),
    "mha-untied": dict(
        vocab_size=320,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=3,
        head_dim=32,
        tie_word_embeddings=False,
    ),
}


def random_prompts(
    lengths: list[int], vocab: int, seed: int, prefix: list[int] | None = None
) -> list[list[int]]:
    """Prompts of random token ids with the given lengths (after an optional shared prefix)."""
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(vocab) for _ in range(n)] for n in lengths]


def assert_reads_as_a_story(reply: str, prompt: str) -> None:
    """`reply` is prose the embedded model wrote for `prompt`: words in sentences, no special
    token spelled out, and not the prompt said back. Loose on purpose: any story passes."""
    words = re.findall(r"[A-Za-z']+", reply)
    assert len(words) >= 30, f"too few words for a story: {reply!r}"
    letters = sum(map(len, words))
    assert letters >= 0.7 * len("".join(reply.split())), f"not mostly words: {reply!r}"
    assert len(re.findall(r"[a-z][.!?]", reply)) >= 3, f"no sentences: {reply!r}"
    assert "<|" not in reply and "|>" not in reply, f"a special token leaked: {reply!r}"
    assert reply.strip() and prompt.strip() not in reply, f"the prompt echoed: {reply!r}"


def all_blocks_unused(stats: Any) -> bool:
    """Every KV block is free or merely cached: no request holds any."""
    return bool(stats.kv_blocks_free + stats.kv_blocks_cached == stats.kv_blocks_total)


def write_random_model(
    directory: Path, seed: int = 0, eos_token_id: int | None = None, **overrides: Any
) -> Qwen3ForCausalLM:
    """Save a randomly initialised Qwen3 (float32) and a tokenizer into `directory`."""
    settings = dict(RANDOM_CONFIGS["gqa4-tied"])
    settings.update(overrides)
    # A wider init than transformers' default makes logits peaked, so greedy parity is not
    # decided by near-ties at the last bit.
    config = Qwen3Config(
        max_position_embeddings=1024, initializer_range=0.08, eos_token_id=eos_token_id, **settings
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    model.save_pretrained(directory)
    byte_level_tokenizer(config.vocab_size).save_pretrained(directory)
    return model


def write_family_model(
    directory: Path, model_type: str, seed: int = 0, max_shard_size: str | None = None,
    **settings: Any,
) -> Any:  # fmt: skip
    """Save a randomly initialised float32 model of transformers' `model_type` ("llama",
    "mistral", "qwen2", "qwen3_moe", ...) and a tokenizer into `directory`; with
    `max_shard_size`, as sharded safetensors with an index."""
    # The wider init of write_random_model, for the same reason (no near-ties in greedy).
    config = AutoConfig.for_model(
        model_type, max_position_embeddings=1024, initializer_range=0.08, **settings
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **extra)
    byte_level_tokenizer(config.vocab_size).save_pretrained(directory)
    return model


def load_reference(directory: Path) -> Qwen3ForCausalLM:
    """transformers' own model (of the architecture config.json names) on the same weights,
    in float32 on the CPU."""
    model: Qwen3ForCausalLM = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


@torch.inference_mode()
def reference_greedy(
    model: Qwen3ForCausalLM, prompt: list[int], max_new_tokens: int, stop_at_eos: bool = True
) -> list[int]:
    """transformers' greedy continuation of `prompt` (the generated ids only)."""
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
    )
    return list(out[0, len(prompt) :].tolist())


def paged_greedy(
    runner: Any, prompts: list[list[int]], max_new_tokens: int, chunk: int | None = None
) -> list[list[int]]:
    """Greedy decoding straight through a `ModelRunner`, with hand-made block tables.

    All prompts prefill together (in chunks of `chunk` tokens if given, mixed with the decodes
    of sequences that finished prefilling), then decode in one batch.
    """
    from asyncllm.engine.runner import SampleSpec, SeqStep
    from asyncllm.sampling import SamplingParams

    greedy = SamplingParams(temperature=0)
    size = runner.block_size
    tables, next_block = [], 0
    for prompt in prompts:
        count = -(-(len(prompt) + max_new_tokens) // size)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    seqs = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    while any(len(s) - len(p) < max_new_tokens for s, p in zip(seqs, prompts)):
        batch, owners = [], []
        for i, seq in enumerate(seqs):
            if len(seq) - len(prompts[i]) >= max_new_tokens:
                continue
            count = len(seq) - computed[i]
            if chunk is not None:
                count = min(count, chunk)
            done = computed[i] + count == len(seq)
            spec = SampleSpec(greedy, 0, len(seq) - len(prompts[i])) if done else None
            batch.append(
                SeqStep(seq[computed[i] : computed[i] + count], computed[i], tables[i], spec)
            )
            owners.append((i, count, done))
        order = sorted(range(len(batch)), key=lambda j: len(batch[j].token_ids) != 1)
        result = runner.execute([batch[j] for j in order])
        sampled = iter(result.token_ids)
        for j in order:
            i, count, done = owners[j]
            computed[i] += count
            if done:
                seqs[i].append(next(sampled))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]
