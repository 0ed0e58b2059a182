"""Flax networks."""
