"""mtrank.data."""
