"""fashionrec gateway."""
