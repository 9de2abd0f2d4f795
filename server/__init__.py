"""The serving side of monaserve: backbone engine, adapter registry, scheduler, HTTP API and CLI."""
