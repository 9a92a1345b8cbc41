"""Keeping a trained run current: versions (versions.py), updates with a gate (update.py), serving
(server.py). The experiment machinery below never imports this package."""
