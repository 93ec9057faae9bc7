"""Run folders: where each run's results go (folders.py), their titles (names.py), and how files
in them are written, crash-safe and one process at a time (files.py)."""
