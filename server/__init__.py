"""rwft.server."""
