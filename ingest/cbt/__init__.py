"""Changed-block tracking: changed-block lists, their loaders and their checks."""
