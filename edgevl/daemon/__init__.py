"""``edgevl run``: the loop, its scheduling and lifecycle, delivery of records, and what the daemon tells of itself."""
