"""Public-dataset layouts filled with synthetic images (for evaluation tests and dry runs)."""
