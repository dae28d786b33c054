"""Above everything: the `fxprune` command line and the graph viewer."""
