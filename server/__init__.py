"""The foliosync relay: an aiohttp WebSocket server that exchanges CRDT deltas between devices."""

__all__: list[str] = []
