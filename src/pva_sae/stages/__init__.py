"""Orchestration: one module per pipeline stage. A stage reads its inputs from the run directory, calls library code and writes its outputs; it never imports another stage."""
