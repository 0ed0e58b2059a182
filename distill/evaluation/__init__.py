"""Metrics, feature networks, grids and reports."""
