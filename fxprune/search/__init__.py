"""Above the compiler core: the statistics, plots, proxy evaluation and process pool of the
network-pruning-space search (the allocation pass itself is fxprune.passes.space_search)."""
