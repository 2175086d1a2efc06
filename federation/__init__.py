"""rwft.federation: what the Flower server and the hospital clients share (protocol, weights that travel, TLS, site keys, processes, the Flower compatibility door)."""
