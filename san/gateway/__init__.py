"""The gateway: an agent, the vdisks' SCSI units and a frontend (built-in iSCSI or LIO), fed only by the protocol."""
