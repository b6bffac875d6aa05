"""fedseg.planning."""
