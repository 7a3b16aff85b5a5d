"""Sparse autoencoders: architectures, file formats, the release registry, training and the general-text filter."""
