"""HTTP API: schemas, error format, SSE framing and routes."""
