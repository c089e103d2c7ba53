"""The `modelyo` command line."""
