"""Run a batch of prompts offline with a progress bar, no event loop of your own needed.

python examples/offline_batch.py --num-prompts 32
"""

from __future__ import annotations

import argparse

from asyncllm import LLM, SamplingParams


def main(num_prompts: int, max_tokens: int, model: str | None) -> None:
    openings = ["Once upon a time", "The little dog", "One day", "In a big forest"]
    prompts = [openings[i % len(openings)] for i in range(num_prompts)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=i)
              for i in range(num_prompts)]  # fmt: skip
    with LLM(model) as llm:
        outputs = llm.generate(prompts, params, progress=True)
        stats = llm.stats()
    for out in outputs[:3]:
        print(repr(out.text[:80]))
    total = sum(out.usage.completion_tokens for out in outputs)
    print(f"{len(outputs)} prompts, {total} tokens, prefix-cache hit rate "
          f"{stats.prefix_cache_hit_rate:.0%}")  # fmt: skip


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", default=None, help="model directory (default: embedded)")
    args = parser.parse_args()
    main(args.num_prompts, args.max_tokens, args.model)
