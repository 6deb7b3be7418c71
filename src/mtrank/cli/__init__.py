"""mtrank.cli."""
