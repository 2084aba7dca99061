"""The one small exception hierarchy. The CLI turns these into a clear message and exit code 2."""


class BlockskipError(Exception):
    """Base of every error that a user can cause and fix."""


class ConfigError(BlockskipError, ValueError):
    """A configuration value is out of range or inconsistent."""


class InputError(BlockskipError):
    """A user-supplied file, path or payload is missing, malformed or of the wrong kind."""


class BundleError(BlockskipError):
    """A bundle failed verification (checksum, signature, layout) or cannot be read."""


class NotAvailableError(BlockskipError):
    """A feature needs an optional dependency or hardware that this build or machine lacks."""
