"""Worker runtime: serves a span of blocks to the swarm (sessions, chained steps, batching)."""
