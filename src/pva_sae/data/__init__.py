"""MBPP tasks, the prompt template and program extraction (no model, no execution)."""
