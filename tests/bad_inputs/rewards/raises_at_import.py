"""A reward file that raises while it is imported."""
raise RuntimeError("the reward module refuses to load")
