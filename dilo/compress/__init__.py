"""Codecs for pseudo-gradients on the wire. Imports only torch."""

from dilo.compress.base import Codec, Encoded, Identity, build_codec

__all__ = ["Codec", "Encoded", "Identity", "build_codec"]
