"""Embedded default jobs: they need nothing but the installed packages (no downloads)."""
