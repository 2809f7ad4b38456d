"""Whole jobs a user asks for: clean, bench, many-model batches."""
