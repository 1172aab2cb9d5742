"""Command-line entry points (main job, benchmarks helpers)."""
