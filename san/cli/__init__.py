"""The san command line: a client of the management API, plus the offline tools (serve, check)."""
