"""Selection: the engine that filters and scores kernels, the plan cache, and explain reports."""
