"""Benchmark harness: scenarios, one process each, side by side with diffusers."""
