"""Built-in task plugins. Each file is one task; copy one to write your own."""
