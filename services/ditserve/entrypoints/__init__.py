"""Subcommands of the `ditserve` command; see ditserve.cli."""
