"""Channel adapters: each maps a protocol onto the batch core and the core's outcome back."""
