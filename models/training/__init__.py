"""Training: the bundled model and its text-aux probes."""
