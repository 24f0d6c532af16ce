"""The life of one slice: rows in, committed captions out, safe against crashes, stops and races."""
