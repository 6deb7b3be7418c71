"""mtrank.config."""
