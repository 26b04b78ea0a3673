"""fashionrec indexer."""
