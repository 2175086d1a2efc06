"""Built-in rwft features, each a plugin module registered exactly like a third-party plugin."""
