"""Benchmarks: scripts that run experiments and write tables and plots under bench/results/."""
