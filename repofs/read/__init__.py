"""The read engine: a restore point's bytes from its map pages, chunks and packs."""
