"""Handles that apps hold: a watchlist or portfolio with async, durable edit methods.

Reads are synchronous (the document is in memory); every edit method returns once the change is
committed to the replica file. Handles are cheap: ask the replica for one whenever needed.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from foliosync.sync.model import Portfolio, Position, Trade, Watchlist, WatchlistEntry

if TYPE_CHECKING:
    from foliosync.client.replica import Replica

__all__ = ["PortfolioHandle", "WatchlistHandle"]


class _Handle:
    def __init__(self, replica: Replica, doc_id: str) -> None:
        self._replica = replica
        self.id = doc_id

    @property
    def pending(self) -> int:
        """Local changes not yet acknowledged by a relay."""
        return self._replica.info(self.id).pending

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id}>"


class WatchlistHandle(_Handle):
    def __init__(self, replica: Replica, doc_id: str, model: Watchlist) -> None:
        super().__init__(replica, doc_id)
        self.model = model

    @property
    def name(self) -> str:
        return self.model.name

    def entries(self) -> list[WatchlistEntry]:
        return self.model.entries()

    @property
    def symbols(self) -> list[str]:
        return self.model.symbols

    async def add(self, symbols: Iterable[str] | str, note: str | None = None) -> list[str]:
        """Add symbols (and set their note if given); returns those newly added."""
        return await self._replica.edit(self.model, lambda m: m.add(symbols, note))

    async def remove(self, symbols: Iterable[str] | str) -> list[str]:
        return await self._replica.edit(self.model, lambda m: m.remove(symbols))

    async def set_note(self, symbol: str, note: str | None) -> None:
        await self._replica.edit(self.model, lambda m: m.set_note(symbol, note))

    async def move(self, symbol: str, index: int) -> None:
        await self._replica.edit(self.model, lambda m: m.move(symbol, index))


class PortfolioHandle(_Handle):
    def __init__(self, replica: Replica, doc_id: str, model: Portfolio) -> None:
        super().__init__(replica, doc_id)
        self.model = model

    @property
    def name(self) -> str:
        return self.model.name

    def trades(self) -> list[Trade]:
        return self.model.trades()

    def positions(self) -> dict[str, Position]:
        return self.model.positions()

    async def add_trade(
        self,
        symbol: str,
        quantity: object,
        price: object,
        time: datetime | None = None,
        note: str | None = None,
    ) -> Trade:
        """Record a trade; quantity and price as text or int (exact), negative quantity sells."""
        return await self._replica.edit(
            self.model, lambda m: m.add_trade(symbol, quantity, price, time, note)
        )

    async def correct_trade(self, trade_id: str, **changes: object) -> Trade:
        return await self._replica.edit(self.model, lambda m: m.correct_trade(trade_id, **changes))

    async def delete_trade(self, trade_id: str) -> None:
        await self._replica.edit(self.model, lambda m: m.delete_trade(trade_id))
