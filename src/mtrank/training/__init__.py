"""mtrank.training."""
