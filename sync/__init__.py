"""What the client and the relay share: the document model, the wire protocol, the market
calendar and the freshness rules. Pure code: nothing here awaits, opens a file or a socket."""

__all__: list[str] = []
