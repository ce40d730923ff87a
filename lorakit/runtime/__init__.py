"""Process-level plumbing every command shares: atomic writes, library noise, ranks, the multi-GPU launcher."""
