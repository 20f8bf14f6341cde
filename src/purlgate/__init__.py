"""purlgate: client data files in, PURL files out, by email or SFTP."""

__version__ = "0.1.0"
