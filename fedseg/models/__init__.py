"""fedseg.models."""
