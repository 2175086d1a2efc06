"""rwft.clients."""
