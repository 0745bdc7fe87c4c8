"""``edgevl eval``: how often a rule's answers are right on labelled frames, and how to calibrate them."""
