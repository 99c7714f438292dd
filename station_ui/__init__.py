"""Operator touch screen for the parts a station sends to review."""
