"""The indexer's HTTP routes, one module per resource (internal API; the gateway is its client)."""
