"""OpenAI-compatible HTTP API: `protocol` (bodies), `serving` (events → bodies), `routes`."""
