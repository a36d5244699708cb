"""A message's weights as one packed array on the wire: `shared_models.protocol`'s codec and
record walk (`pack_records` / `unpack_records`) given Flower's record classes.

The node's side: `client.node.own_code` unpacks a task's message and packs its reply;
`server.superlink.packing` is the ServerApp's side.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, RecordDict

from shared_models import protocol
from shared_models.protocol import PackedArraysError

__all__ = ["PackedArraysError", "pack_records", "unpack_records"]

_FLOWER = protocol.RecordTypes(record_dict=RecordDict, array_record=ArrayRecord, array=Array)


def pack_records(content: RecordDict) -> RecordDict:
    """`shared_models.protocol.pack_records` on Flower's records."""
    return protocol.pack_records(content, _FLOWER)  # type: ignore[no-any-return]


def unpack_records(content: RecordDict) -> RecordDict:
    """`shared_models.protocol.unpack_records` on Flower's records.

    Raises:
        PackedArraysError: a packed array is corrupt, or sits beside other arrays.
    """
    return protocol.unpack_records(content, _FLOWER)  # type: ignore[no-any-return]
