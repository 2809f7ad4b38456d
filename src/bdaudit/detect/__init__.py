"""Probing known triggers and searching for unknown ones."""
