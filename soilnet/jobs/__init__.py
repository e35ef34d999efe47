"""Entry points: ..."""
