"""mtrank.serving."""
