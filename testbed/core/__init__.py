"""Foundations: errors, atomic writes, hashing, processes, JSON, progress, devices, plugins, palette, output guards."""
