"""fedseg.client."""
