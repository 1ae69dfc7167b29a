"""The reproduction studies behind ``normkit reproduce`` (needs the ``experiments`` extra).

Never imported by the library itself.
"""
