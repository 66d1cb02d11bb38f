"""Importers: real datasets on disk → one dataset file (docs/data-format.md), one module per dataset.

The modules: ``camvid``, ``cityscapes``, ``voc``, ``ade20k``, ``folder``; ``base`` holds what they share (pairing, the decoding pool, the atomic writer, :class:`ImportOptions`).
"""

from testbed.data.imagefiles import Resize
from testbed.data.importers.ade20k import ADE20K_NUM_CLASSES, ade20k_classes, import_ade20k
from testbed.data.importers.base import IMAGE_EXTENSIONS, ImportOptions, read_classes_file
from testbed.data.importers.camvid import CAMVID_CLASSES, CAMVID_PALETTE, import_camvid
from testbed.data.importers.cityscapes import CITYSCAPES_CLASSES, import_cityscapes
from testbed.data.importers.folder import FolderLayout, import_folder
from testbed.data.importers.voc import VOC_CLASSES, import_voc

__all__ = ["ADE20K_NUM_CLASSES", "CAMVID_CLASSES", "CAMVID_PALETTE", "CITYSCAPES_CLASSES", "FolderLayout", "IMAGE_EXTENSIONS",
           "ImportOptions", "Resize", "VOC_CLASSES", "ade20k_classes", "import_ade20k", "import_camvid",
           "import_cityscapes", "import_folder", "import_voc", "read_classes_file"]
