"""Learning: datasets, models (and loading a saved one), losses, training, hyperparameter search."""
