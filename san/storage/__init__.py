"""Physical storage: container files and block devices, and the byte-level operations on them."""
