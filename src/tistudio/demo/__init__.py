"""The built-in demo: the world model, its renderer, and the whole story on it."""
