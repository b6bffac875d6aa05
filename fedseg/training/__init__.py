"""fedseg.training."""
