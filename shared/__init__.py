"""Code both the hub and the worker use: wire models, Redis key schema, settings, errors, geo."""
