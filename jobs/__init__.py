"""Thin, submittable entry points: python -m jobs.<name>."""
