"""The egress gateway: the only way out of a sandbox in network mode `gateway`."""
