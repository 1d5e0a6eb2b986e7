"""CLI verbs, one module each (see `ctseg.cli`)."""
