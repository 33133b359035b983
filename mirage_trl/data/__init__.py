"""Benchmark data: reference-format loading (SAT and CoMT rows are brought by the user in that format),
generators (VSP, Jigsaw), images, and the collator that turns rows into batches."""
