"""Reference-layout modules of the published OneDC (REFERENCE.md): weight-compatible with the released files."""
