"""The built-in iSCSI target (RFC 7143): PDUs, login negotiation, sessions and connections, and the asyncio server.

Protocol objects are sans-I/O (bytes in, bytes out); server.py is the thin shell that owns the sockets."""
