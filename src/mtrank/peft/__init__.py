"""mtrank.peft."""
