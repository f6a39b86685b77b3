"""One-off research probes behind figures in docs/ (not installed with fedsubtype)."""
