"""Optional Prometheus metrics for an engine (needs `prometheus_client`).

Example:
    >>> from prometheus_client import REGISTRY, generate_latest  # doctest: +SKIP
    >>> register_prometheus(engine)  # doctest: +SKIP
    >>> print(generate_latest(REGISTRY).decode())  # doctest: +SKIP

Everything is read from `engine.stats()` when the registry is scraped, so the engine's
step loop pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from asyncllm.engine.async_engine import AsyncEngine

__all__ = ["EngineCollector", "register_prometheus"]


class EngineCollector:
    """A prometheus_client collector exposing one engine's stats."""

    def __init__(self, engine: AsyncEngine, prefix: str = "asyncllm") -> None:
        self.engine = engine
        self.prefix = prefix

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.engine.stats()
        p = self.prefix
        gauges = {
            "requests_running": (stats.running, "Requests being computed"),
            "requests_waiting": (stats.waiting, "Requests queued for admission"),
            "kv_blocks_total": (stats.kv_blocks_total, "KV-cache blocks in the pool"),
            "kv_blocks_free": (stats.kv_blocks_free, "KV-cache blocks holding nothing"),
            "kv_blocks_cached": (stats.kv_blocks_cached, "Unused KV blocks kept for prefixes"),
            "kv_usage_ratio": (stats.kv_usage, "Fraction of KV blocks held by requests"),
            "prefix_cache_hit_ratio": (stats.prefix_cache_hit_rate, "Prompt tokens from cache"),
        }
        for name, (value, doc) in gauges.items():
            yield GaugeMetricFamily(f"{p}_{name}", doc, value=value)
        counters = {
            "steps": (stats.num_steps, "Engine steps run"),
            "preemptions": (stats.num_preemptions, "Requests preempted for KV space"),
            "requests_finished": (stats.num_finished, "Requests finished or aborted"),
            "prompt_tokens": (stats.prompt_tokens_total, "Prompt tokens admitted"),
            "generated_tokens": (stats.generated_tokens_total, "Tokens generated"),
            "prefix_cache_hit_tokens": (stats.prefix_cache_hit_tokens, "Prompt tokens cached"),
            "requests_rejected_overloaded": (
                stats.num_rejected_overloaded,
                "Submissions refused: waiting queue full",
            ),
        }
        for name, (value, doc) in counters.items():
            yield CounterMetricFamily(f"{p}_{name}", doc, value=value)


def register_prometheus(
    engine: AsyncEngine, registry: Any = None, prefix: str = "asyncllm"
) -> EngineCollector:
    """Register `engine`'s metrics with `registry` (default: prometheus_client's global one)."""
    from prometheus_client import REGISTRY

    collector = EngineCollector(engine, prefix)
    (registry or REGISTRY).register(collector)
    return collector
