"""The files a converted FAM checkpoint carries as remote code (torch + transformers only)."""
