"""Tasks: what the app and the CLI call (validation, orchestration over models and read-outs)."""
