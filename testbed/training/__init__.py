"""Training: the loop, its settings, the run directory (lock, resume, checkpoints), saved runs, provenance."""
