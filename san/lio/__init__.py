"""The production frontend: the kernel's LIO target speaks iSCSI, san's TCMU handler serves the CDBs, and san keeps
LIO's configuration (storage objects, ACLs, mapped LUNs) in step with the controller."""
