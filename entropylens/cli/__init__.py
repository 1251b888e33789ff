"""The `entropylens` command line (typer): commands and their printed tables."""
