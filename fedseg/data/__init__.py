"""fedseg.data."""
