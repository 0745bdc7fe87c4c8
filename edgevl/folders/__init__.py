"""Watched folders: which files are ready to be taken, and which folders may be watched at all."""
