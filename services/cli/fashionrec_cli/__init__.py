"""fashionrec cli."""
