"""Scoring: confusion-matrix metrics and the scorer (mIoU-B, ASR, PBA, ...)."""
