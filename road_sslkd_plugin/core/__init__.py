"""Logic without widgets: backend search and set-up, the subprocess protocol, layers, settings, results."""
