"""KV-block bookkeeping: reference-counted blocks and the chained-hash prefix cache.

Every full block of a request is named by a chained xxhash: hash(parent block's hash, this
block's token ids), so equal hashes mean equal whole prefixes. Registered blocks keep their
content after their last user frees them and sit in an LRU pool; a later request whose prompt
starts with the same blocks takes them back instead of recomputing them. A hit is verified
against the block's stored token ids, so a hash collision can never serve wrong K/V.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable

import xxhash

from asyncllm.engine.request import Request

__all__ = ["Block", "BlockManager", "chain_hash"]

_ROOT_HASH = 0x6173796E636C6C6D  # "asyncllm": parent of every first block


def chain_hash(parent: int, token_ids: Iterable[int]) -> int:
    """Hash of a full block given its parent block's hash and its own token ids."""
    data = parent.to_bytes(8, "little") + array("q", token_ids).tobytes()
    digest: int = xxhash.xxh3_64_intdigest(data)
    return digest


class Block:
    """One physical KV block."""

    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    """Hands out blocks to requests and keeps the prefix cache.

    Unreferenced blocks live in one of two pools: `free` (nothing reusable; handed out first)
    and `cached` (registered content, evicted least-recently-freed first).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._by_hash: dict[int, int] = {}
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks holding nothing reusable."""
        return len(self._free)

    @property
    def num_unused_blocks(self) -> int:
        """Blocks `allocate` can hand out (free or evictable)."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks with reusable content."""
        return len(self._cached)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookups --------------------------------------------------------------

    def cached_prefix(self, req: Request) -> list[int]:
        """Blocks of `req`'s longest cached prefix of full blocks.

        The last known token is never served from the cache: it must be computed so that the
        step produces logits to sample from.
        """
        if not self.enable_prefix_caching:
            return []
        limit = (req.num_tokens - 1) // self.block_size
        hashes = self._hashes(req, limit)
        hits: list[int] = []
        for index in range(limit):
            block_id = self._by_hash.get(hashes[index])
            start = index * self.block_size
            tokens = req.token_ids[start : start + self.block_size]
            if block_id is None or self.blocks[block_id].token_ids != tuple(tokens):
                break
            hits.append(block_id)
        return hits

    def _hashes(self, req: Request, num_blocks: int) -> list[int]:
        """`req`'s memoised chain hashes, extended to cover its first `num_blocks` blocks."""
        hashes, size = req.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            start = len(hashes) * size
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(chain_hash(parent, req.token_ids[start : start + size]))
        return hashes

    # ---- allocation --------------------------------------------------------------------------

    def allocate(self, req: Request, num_new_tokens: int, cached: list[int] | None = None) -> bool:
        """Give `req` blocks for `num_new_tokens` more tokens (after its computed ones).

        `cached` (on admission only) are prefix-cache hits that become the request's first
        blocks. Returns False, changing nothing, when the pool cannot cover it.
        """
        if cached:
            return self._admit_with_hits(req, num_new_tokens, cached)
        total = req.num_computed_tokens + num_new_tokens
        new = -(-total // self.block_size) - len(req.block_ids)
        if new <= 0:
            return True  # the common decode step: the last block still has room
        if new > len(self._free) + len(self._cached):
            return False
        req.block_ids.extend(self._pop_unused() for _ in range(new))
        return True

    def _admit_with_hits(self, req: Request, num_new_tokens: int, cached: list[int]) -> bool:
        total = len(cached) * self.block_size + num_new_tokens
        new = self.blocks_needed(total) - len(cached)
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        if new + revived > len(self._free) + len(self._cached):
            return False
        for block_id in cached:
            self._take(block_id)
        req.block_ids.extend(cached)
        req.num_registered_blocks += len(cached)
        req.block_ids.extend(self._pop_unused() for _ in range(new))
        return True

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached[block_id]
        block.ref_count += 1

    def _pop_unused(self) -> int:
        if self._free:
            block_id = self._free.pop()
        else:
            block_id, _ = self._cached.popitem(last=False)  # evict least recently freed
            self._forget(self.blocks[block_id])
        self.blocks[block_id].ref_count = 1
        return block_id

    def _forget(self, block: Block) -> None:
        if block.hash is not None and self._by_hash.get(block.hash) == block.block_id:
            del self._by_hash[block.hash]
        block.hash = block.token_ids = None

    def free(self, req: Request) -> None:
        """Drop `req`'s references; its registered blocks stay reusable until evicted."""
        # Reversed: a sequence's tail blocks are the least likely to be shared, so they are
        # queued for eviction before its head blocks.
        for block_id in reversed(req.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed more often than taken"
            if block.ref_count == 0:
                if block.hash is None:
                    self._free.append(block_id)
                else:
                    self._cached[block_id] = None
        req.drop_blocks()

    # ---- registration ------------------------------------------------------------------------

    def register_full_blocks(self, req: Request) -> None:
        """Make `req`'s blocks that are now full of computed tokens findable by later requests."""
        if not self.enable_prefix_caching:
            return
        # Tokens drawn by launched steps are computed-to-be but not known yet: not hashable.
        known = min(req.num_computed_tokens, req.num_tokens)
        num_full = min(known // self.block_size, len(req.block_ids))
        if num_full <= req.num_registered_blocks:
            return
        hashes = self._hashes(req, num_full)
        for index in range(req.num_registered_blocks, num_full):
            block = self.blocks[req.block_ids[index]]
            if block.hash is not None or hashes[index] in self._by_hash:
                continue  # already registered, or the same content lives in another block
            start = index * self.block_size
            block.hash = hashes[index]
            block.token_ids = tuple(req.token_ids[start : start + self.block_size])
            self._by_hash[block.hash] = block.block_id
        req.num_registered_blocks = num_full

    def reset_prefix_cache(self) -> None:
        """Forget all cached content: unreferenced cached blocks become plain free blocks;
        blocks in use stay with their requests but are no longer findable."""
        for block_id in self._cached:
            self._forget(self.blocks[block_id])
            self._free.append(block_id)
        self._cached.clear()
        for block_id in list(self._by_hash.values()):
            self._forget(self.blocks[block_id])

    def record_lookup(self, num_query_tokens: int, num_hit_tokens: int) -> None:
        self.query_tokens += num_query_tokens
        self.hit_tokens += num_hit_tokens

    # ---- invariants (tests) ------------------------------------------------------------------

    def check_invariants(self, live: Iterable[Request]) -> None:
        """Assert the bookkeeping is consistent with the requests that hold blocks."""
        refs = [0] * self.num_blocks
        for req in live:
            assert len(set(req.block_ids)) == len(req.block_ids), "a block twice in one request"
            for block_id in req.block_ids:
                refs[block_id] += 1
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "a block twice in the free pool"
        assert not free & cached, "a block in both pools"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], f"block {block.block_id} ref count"
            unused = block.block_id in free or block.block_id in cached
            assert unused == (block.ref_count == 0), f"block {block.block_id} pool membership"
            if block.block_id in free:
                assert block.hash is None, "a registered block in the free pool"
            if block.block_id in cached:
                assert block.hash is not None, "an unregistered block in the cached pool"
        for block_hash, block_id in self._by_hash.items():
            assert self.blocks[block_id].hash == block_hash, "hash index points to a stale block"
