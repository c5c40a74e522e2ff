"""Persistent tables: the store interface, its SQLite implementation and the offline checker."""
