"""The foliosync client library: a local SQLite replica of a user's documents, kept in sync."""

__all__: list[str] = []
