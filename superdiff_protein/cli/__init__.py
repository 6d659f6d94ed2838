"""Thin command-line entry points (the only library modules that import ``models``)."""
