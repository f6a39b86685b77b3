"""Benchmarks that reproduce published protocols on the phantom or any manifest."""
