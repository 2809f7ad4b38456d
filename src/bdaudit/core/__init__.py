"""Foundations every layer may use: errors, settings, data, runtime, safe outputs."""
