"""The foliosync client library: a local SQLite replica of a user's documents that syncs with a relay."""

__all__: list[str] = []
