"""san-shell: san managed the way targetcli manages LIO (a tree of pools, vdisks, hosts, gateways and jobs), and the
same tree as /san inside stock targetcli (san-targetcli)."""
