"""`lorakit train`: the TRL trainers built from a recipe and its plan, the callbacks that guard a run, the run
directory."""
