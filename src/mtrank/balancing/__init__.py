"""mtrank.balancing."""
