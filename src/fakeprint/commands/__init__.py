"""Sub-commands beyond the core ones in ``fakeprint.cli`` (one module each, ``register(subparsers)``)."""
