"""foliosync: an offline-first sync engine for portfolio apps.

The package has three parts, each importable on its own:

- :mod:`foliosync.sync`: what both sides share (document model, wire protocol, market calendar,
  freshness rules). Pure code, no I/O.
- :mod:`foliosync.client`: the library that apps embed (:class:`~foliosync.client.Replica`,
  :class:`~foliosync.client.SyncClient`) and the ``foliosync`` command.
- :mod:`foliosync.server`: the relay (:func:`~foliosync.server.create_app`).

Nothing is imported here, so that ``import foliosync.sync`` does not pay for aiohttp or SQLite.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
