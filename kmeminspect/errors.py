"""Errors that end a command with one line for the user and exit status 2."""


class KmemError(Exception):
    """Something the user can fix; the message says what is wrong and what to do."""


class TargetError(KmemError):
    """The kernel, dump or guest could not be opened."""


class ReadError(KmemError):
    """The kernel's state could not be read as expected."""


class UsageError(KmemError):
    """Bad arguments: a pfn out of range, a malformed range, an unknown snapshot version."""
