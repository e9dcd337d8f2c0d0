"""Former home of the shared data helpers, kept as re-exports for one release. Import from the modules:

* ``errors``: ``Reject`` (drop one counted row), ``SourceError`` (stop one dataset with one line).
* ``images``: ``ImagePolicy(max_pixels, check).prepare(data)``, ``image_value_bytes``.
* ``paths``: ``image_roots``, ``resolve_image_path``, ``read_image_file`` (reads confined to image roots).
* ``parquet_out``: ``OUTPUT_SCHEMA``, ``output_table``, ``ShardWriter``, ``RejectLog``, ``open_parquet_writer``.
* ``files``: ``atomic_output``, ``write_json_atomic``, ``read_json``, ``file_lock``, ``update_dataset_info``.
"""

from __future__ import annotations

from .errors import Reject, SourceError
from .files import atomic_output, file_lock, read_json, update_dataset_info, write_json_atomic
from .images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_CHECKS, KEEP_IMAGE_FORMATS, ImagePolicy, image_value_bytes
from .parquet_out import (
    COLUMN_COMPRESSION,
    IMAGE_PLACEHOLDER,
    OUTPUT_SCHEMA,
    ROWS_PER_ROW_GROUP,
    RejectLog,
    ShardWriter,
    int32_array,
    open_parquet_writer,
    output_table,
    string_array,
)
from .paths import IMAGE_ROOTS_ENV, image_roots, read_image_file, resolve_image_path

__all__ = [
    "COLUMN_COMPRESSION", "DEFAULT_MAX_IMAGE_PIXELS", "IMAGE_CHECKS", "IMAGE_PLACEHOLDER", "IMAGE_ROOTS_ENV",
    "KEEP_IMAGE_FORMATS", "OUTPUT_SCHEMA", "ROWS_PER_ROW_GROUP", "Reject", "RejectLog", "ShardWriter", "SourceError",
    "atomic_output", "file_lock", "image_roots", "image_value_bytes", "ImagePolicy", "int32_array",
    "open_parquet_writer", "output_table", "read_image_file", "read_json", "resolve_image_path", "string_array",
    "update_dataset_info", "write_json_atomic",
]
