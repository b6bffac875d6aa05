"""fedseg.privacy."""
