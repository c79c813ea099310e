"""Simili's retrieval core: image loading, backbones and embedding, free of Django."""
