"""san: a software SAN target with table-driven virtual disks over shared, thin-provisioned pools.

Layers: agent (volatile map tables, I/O), controller (pools, allocator, policy), store (persistent tables)."""

__version__ = "0.1.0"
