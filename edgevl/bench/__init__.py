"""``edgevl bench`` and the random-weight checkpoints it and the tests build; imported only by those."""
