"""Evaluation: the threat-model boundary, the defense runner, scoring of defense results into typed rows."""
