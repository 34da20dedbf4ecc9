"""Transports move tensors between workers; they raise only `dilo.errors.TransportError`."""
