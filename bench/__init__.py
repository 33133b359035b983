"""Ratio benchmarks: each script compares two things measured in one run on the same machine."""
