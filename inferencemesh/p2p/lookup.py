"""What clients ask the DHT: the providers of every block of a model, and the state of the swarm."""

from __future__ import annotations

from dataclasses import dataclass

from inferencemesh.p2p.node import DHTNode
from inferencemesh.p2p.records import MODELS_KEY, ProviderEntry, block_key, model_directory_key


async def find_block_providers(
    node: DHTNode, model_id: str, num_blocks: int
) -> dict[int, list[ProviderEntry]]:
    """Verified live entries for each block ``0 .. num_blocks-1`` of ``model_id``, in one batch.

    A block nobody serves maps to an empty list; see :meth:`DHTNode.find_entries` for what is
    filtered out.
    """
    if num_blocks <= 0:
        raise ValueError(f"num_blocks must be positive, got {num_blocks}")
    names = [block_key(model_id, block) for block in range(num_blocks)]
    found = await node.find_entries(names)
    return {block: found[name] for block, name in enumerate(names)}


@dataclass(frozen=True)
class ModelStatus:
    model_id: str
    total_blocks: int  # the largest block count any worker of this model announced
    workers: list[ProviderEntry]

    @property
    def coverage(self) -> list[int]:
        """How many workers serve each block."""
        counts = [0] * self.total_blocks
        for entry in self.workers:
            for block in entry.blocks:
                counts[block] += 1
        return counts

    @property
    def missing_blocks(self) -> list[int]:
        return [block for block, count in enumerate(self.coverage) if count == 0]


@dataclass(frozen=True)
class SwarmStatus:
    models: dict[str, ModelStatus]

    @property
    def live_workers(self) -> set[bytes]:
        return {entry.peer_id for status in self.models.values() for entry in status.workers}


async def swarm_status(node: DHTNode) -> SwarmStatus:
    """Models seen in the swarm, with their live workers and per-block coverage.

    The models index is one DHT key, so it lists at most the storing nodes' per-key cap of workers
    (64 by default); each model's workers come from that model's own directory key.
    """
    index = (await node.find_entries([MODELS_KEY]))[MODELS_KEY]
    model_ids = sorted({entry.model_id for entry in index})
    directories = await node.find_entries([model_directory_key(m) for m in model_ids])
    models = {}
    for model_id in model_ids:
        workers = directories[model_directory_key(model_id)]
        if workers:
            total = max(entry.total_blocks for entry in workers)
            models[model_id] = ModelStatus(model_id, total, workers)
    return SwarmStatus(models)
