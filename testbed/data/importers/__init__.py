"""Importers: real datasets on disk → one dataset file (docs/data-format.md), one module per dataset.

``base`` holds what they share (pairing, the decoding pool, the atomic writer, :class:`ImportOptions`).
"""

from testbed.data.imagefiles import Resize
from testbed.data.importers.ade20k import ADE20K_NUM_CLASSES, ade20k_classes, import_ade20k
from testbed.data.importers.base import IMAGE_EXTENSIONS, ImportOptions, read_classes_file
from testbed.data.importers.camvid import CAMVID_CLASSES, CAMVID_PALETTE, import_camvid
from testbed.data.importers.folder import import_folder

__all__ = ["ADE20K_NUM_CLASSES", "CAMVID_CLASSES", "CAMVID_PALETTE", "IMAGE_EXTENSIONS", "ImportOptions", "Resize",
           "ade20k_classes", "import_ade20k", "import_camvid", "import_folder", "read_classes_file"]
