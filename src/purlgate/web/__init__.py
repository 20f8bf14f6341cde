"""The HTTP side of a region: landing pages, thumbnails and videos behind the links.

Reads the batch store and the row store; imports no channel, and no channel imports it.
"""
