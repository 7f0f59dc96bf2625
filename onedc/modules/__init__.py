"""Plain ``nn.Module``s of OneDC: no Lightning, no config objects (docs/architecture.md).

The modules directly in this package (and ``teachers/``) are the shared blocks both model
families use; ``light/`` holds the light hyperprior codec and ``reference/`` the published
OneDC. Neither family package imports the other.
"""
