"""mtrank.models."""
