"""Built-in bertpress passes, one module each.

``passes/options.py`` declares them (options and ordering, torch-free); a pass's module is imported the first time
a compile runs it (``compiler.pass_registry.get_pass``).
"""
