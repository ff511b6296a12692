"""The repofs command line."""
