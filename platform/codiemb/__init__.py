"""codiemb: unified text-embedding training (retrieval + STS) on Ray."""

__version__ = "0.1.0"
