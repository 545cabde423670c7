"""Model files of other tools, read and written safely."""
