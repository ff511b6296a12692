"""The repository on disk: records, packs, index, maps, writer, locks, restore points."""
