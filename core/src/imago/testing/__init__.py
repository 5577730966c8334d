"""Conformance suites for storage and format plugins (a pytest plugin).

A plugin's tests subclass the suites and implement their factory methods::

    from imago.testing import StorageConformance

    class TestMyStorage(StorageConformance):
        def create_storage(self, directory, size):
            return MyStorage.create_sync(...)

Every ``test_*`` method of the suite then runs against the plugin's driver.
"""

from .format import FormatConformance
from .model import DiskModel
from .readonly import ReadOnlyFormatConformance
from .storage import StorageConformance

__all__ = ["DiskModel", "FormatConformance", "ReadOnlyFormatConformance", "StorageConformance"]
