"""Thin CLI commands; discovered by surgery.cli."""
