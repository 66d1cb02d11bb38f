"""Execution: where jobs run (this process, spawned processes, Ray), and the claims that keep two workers apart."""
