"""Training: config, optimizer, objective, jitted steps, trainer loop and metrics."""
