"""The SCSI layer: a direct-access block device per vdisk (SPC-4/SBC-3), shared by every frontend.

Sans-I/O toward the initiator: a CDB and its data-out go in, status, sense and data-in come out."""
