"""The local launcher: every service of a pipeline as its own process on loopback."""
