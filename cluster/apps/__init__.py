"""Built-in demo apps: ``echo`` (stream and datagram echo) and ``http-hello``."""
