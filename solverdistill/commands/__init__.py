"""Engine entry points behind the CLI commands (one module per command; the CLI only parses and prints)."""
