"""Distillation methods: each a loss function plus a plan of rounds."""
