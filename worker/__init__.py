"""The worker agent every GPU instance runs: capacity from VRAM, registration, heartbeats, sessions, draining."""
