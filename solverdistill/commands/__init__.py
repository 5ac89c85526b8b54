"""The `sdistill` commands, one module each: parse the flags, call the engine, print (rich, results on stdout,
messages and progress on stderr)."""
