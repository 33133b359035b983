"""Benchmark data: reference-format loading, generators (VSP, Jigsaw) and user-data loaders (SAT, COMT)."""
