"""Server container: serve digit predictions from a LiteRT model over HTTP."""
