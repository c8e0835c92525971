class ExportError(Exception):
    """A failed export step; the CLI prints the message as one line and exits non-zero."""
