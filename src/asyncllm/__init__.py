"""asyncllm: an asyncio-native LLM inference engine."""
