"""The embedded default: tiny models and tokenizers, corpora, and the recipe that trains the shipped model and SAEs."""
