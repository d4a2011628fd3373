"""A package that lives in a folder which is not on sys.path (see code_from_folder.py)."""
from .shapes import Square, area_of

VERSION = 1

__all__ = ["Square", "area_of", "VERSION"]
