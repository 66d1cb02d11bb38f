"""The demo: synthetic data, attacks, training, defenses and a report in a few minutes."""
