"""The mapping agent: volatile map tables, I/O translation, container reads and writes, fault handling."""
