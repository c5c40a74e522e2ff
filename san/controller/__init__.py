"""The controller: pools, the allocator, vdisk management and the answers to agents' faults."""
