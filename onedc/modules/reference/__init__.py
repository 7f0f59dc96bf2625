"""Reference-layout modules of the published OneDC (docs/reference-model.md): weight-compatible with the released files."""
