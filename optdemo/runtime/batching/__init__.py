"""Continuous batching: the scheduler, the left-padded batch, row-exact attention and per-request
sampling."""
