"""Chip profiles and per-target lowerings."""
