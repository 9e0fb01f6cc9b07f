"""Images: the store, archive import, layers, the registry client and its auth, the builder."""
