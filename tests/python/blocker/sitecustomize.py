"""Imported at start-up by every Python process that has this folder on PYTHONPATH (site's
``sitecustomize`` hook): the top-level modules named in ``GPUFLEET_TEST_BLOCK`` (comma-separated)
then fail to import exactly as an uninstalled package does (``ModuleNotFoundError`` from the import
system), while everything else imports as usual. Tests use it to run gpufleet, the CLI and the
examples as on a machine without an extra, in a real subprocess."""
import os
import sys

_BLOCKED = frozenset(m for m in os.environ.get("GPUFLEET_TEST_BLOCK", "").split(",") if m)


class _NotInstalled:
    """First on sys.meta_path: answers for the blocked names before any real finder can."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


if _BLOCKED:
    sys.meta_path.insert(0, _NotInstalled())
