"""distill: distillation of classifier-free-guided diffusion models in JAX/Flax."""
