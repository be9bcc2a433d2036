"""The HTTP layer: routers, request schemas, wire formats and error mapping."""
