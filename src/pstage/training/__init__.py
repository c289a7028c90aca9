"""Training: recipes, one fit path, `train` (folds, resume, final fit)."""
