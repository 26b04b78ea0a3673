"""fashionrec embedder."""
