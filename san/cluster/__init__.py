"""The cluster: its certificate authority and node credentials, and the mutual TLS between controller and gateways."""
