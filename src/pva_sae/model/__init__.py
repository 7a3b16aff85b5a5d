"""Models: registry and loading, the hooks that touch model internals, capture of residuals, generation and the fast Gemma-2 decoder."""
