"""Evaluation: cross-validation folds (`folds`), metrics (`metrics`), clinical measurements (`measure`)."""
