"""The `fleet` command: runs a hub, a worker or a local demo fleet, and gives SREs a view of the registry."""
