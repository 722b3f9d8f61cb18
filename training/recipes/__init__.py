"""Reproducible training recipes: one command each, from generated data to a model directory."""
