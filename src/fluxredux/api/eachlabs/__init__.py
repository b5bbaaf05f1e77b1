"""The hosted (Eachlabs) contract: its routes, response shapes and renderer."""
