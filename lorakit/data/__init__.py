"""Training rows: load, detect the format, tokenize and mask."""
