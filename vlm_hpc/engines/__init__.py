"""Caption engines: tiles in, captions out."""
