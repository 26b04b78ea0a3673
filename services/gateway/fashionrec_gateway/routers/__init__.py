"""HTTP routers of the public API, one module per resource."""
