"""`make bench`: speed and memory measured side by side, reported as ratios (see README)."""
