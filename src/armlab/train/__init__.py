"""Training: model, optimiser, loader, loop, launcher."""
